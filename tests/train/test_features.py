import pytest
import torch

from helper.run.errors import UserError
from helper.train.features import DEFAULT_LAYERS, FeatureHooks, resolve_layers
from models import resnet18


def test_default_layers_are_the_eight_block_conv1():
    model = resnet18(width=4)
    assert resolve_layers(model, DEFAULT_LAYERS) == [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in (0, 1)]


def test_hooks_capture_conv1_outputs_and_are_removed():
    model = resnet18(width=4).eval()
    x = torch.rand(2, 3, 32, 32)
    captured = {}
    h = model.layer2[0].conv1.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with FeatureHooks(model) as hooks:
        model(x)
        feats = hooks.pop()
        assert list(feats) == hooks.layers and len(feats) == 8
        torch.testing.assert_close(feats["layer2.0.conv1"], captured["out"])
        assert feats["layer1.0.conv1"].shape == (2, 4, 32, 32)
        assert feats["layer4.1.conv1"].shape == (2, 32, 4, 4)
        assert hooks.pop() == {}  # popped: nothing kept
        hooks.enabled = False
        model(x)
        assert hooks.features == {}
    h.remove()
    assert all(not m._forward_hooks for m in model.modules())


def test_exact_names_and_missing_layer_error():
    model = resnet18(width=4)
    assert resolve_layers(model, ["layer3.1.conv1", "layer1.0.conv1"]) == ["layer1.0.conv1", "layer3.1.conv1"]
    with pytest.raises(UserError, match=r"'layer5\.0\.conv1' does not exist"):
        FeatureHooks(model, ["layer5.0.conv1"])
    assert all(not m._forward_hooks for m in model.modules())
