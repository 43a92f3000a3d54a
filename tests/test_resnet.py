import pytest
import torch

from models import resnet18

KEYS_AT_WIDTH_64 = 11_173_962


def test_standard_model_parameter_count_and_keys():
    model = resnet18(num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == KEYS_AT_WIDTH_64
    keys = set(model.state_dict())
    expected = {"conv1.weight", "bn1.weight", "linear.weight", "linear.bias"}
    for layer in range(1, 5):
        for block in (0, 1):
            for part in ("conv1", "bn1", "conv2", "bn2"):
                expected.add(f"layer{layer}.{block}.{part}.weight")
    for layer in (2, 3, 4):
        expected |= {f"layer{layer}.0.shortcut.0.weight", f"layer{layer}.0.shortcut.1.running_mean"}
    assert expected <= keys
    assert "layer1.0.shortcut.0.weight" not in keys  # no projection where shapes already agree
    assert not any(k.startswith("module.") for k in keys)


@pytest.mark.parametrize("width", [4, 8])
def test_narrow_model_shapes(width):
    model = resnet18(num_classes=10, width=width)
    assert model.conv1.weight.shape == (width, 3, 3, 3)
    assert model.layer4[1].conv2.weight.shape == (8 * width, 8 * width, 3, 3)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
