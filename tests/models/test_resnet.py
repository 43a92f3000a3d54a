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


def test_strided_shortcut_is_the_strided_convolution():
    """The shortcut's 1x1 stride-2 convolution, computed on x[:, :, ::2, ::2]: the same numbers as Conv2d's."""
    from models.resnet import StridedPointwise
    torch.manual_seed(0)
    conv = StridedPointwise(4, 8, 1, stride=2, bias=False)
    x = torch.rand(3, 4, 9, 9)
    assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, conv.weight, stride=2), atol=1e-6)
    assert isinstance(conv, torch.nn.Conv2d)  # CLP, Fine-Pruning and the hooks see a convolution


ODD_BATCH = """
import torch
from models import resnet18
torch.manual_seed(0)
m = resnet18(10, {width}).to(memory_format=torch.channels_last)
for _ in range(3):
    x = torch.rand({batch}, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    m(x).square().mean().backward()
print("ok")
"""


@pytest.mark.parametrize("width,batch,threads", [(4, 64, 1), (4, 51, 2), (8, 51, 2), (8, 33, 2), (8, 127, 1)])
def test_channels_last_forward_backward_does_not_crash(width, batch, threads):
    """In a subprocess, so that a crash fails this test instead of killing the suite: PyTorch's strided 1x1 CPU
    kernel in channels_last corrupted the heap or hung (torch 2.14.1, AMD EPYC: width 4 at batch 64 with one
    thread, odd batches of width 8 with two); the model no longer calls it (``StridedPointwise``)."""
    import os
    import subprocess
    import sys

    from tests import ROOT as root
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", ODD_BATCH.format(width=width, batch=batch)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
