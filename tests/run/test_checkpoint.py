import os
import pickle

import pytest
import torch

from helper.data.teacher_dir import load_trigger
from helper.data.trigger import apply_trigger, threshold_mask
from helper.run.checkpoint import load_model, load_state_dict, save_checkpoint
from helper.run.errors import UserError
from models import resnet18


@pytest.fixture
def model():
    torch.manual_seed(0)
    return resnet18(width=4).eval()


@pytest.mark.parametrize("wrap", ["list", "state_dict", "bare", "module"])
def test_checkpoint_formats_load_the_same_weights(tmp_path, model, wrap):
    sd = model.state_dict()
    obj = {"list": [sd], "state_dict": {"state_dict": sd, "epoch": 3},
           "bare": sd, "module": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    path = str(tmp_path / "ck.pkl")
    torch.save(obj, path)
    loaded = load_model(path).eval()
    assert loaded.width == 4 and loaded.num_classes == 10
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def test_save_checkpoint_is_adba_format(tmp_path, model):
    path = str(tmp_path / "ck.pkl")
    save_checkpoint(model, path)
    obj = torch.load(path, weights_only=True)
    assert isinstance(obj, list) and len(obj) == 1 and set(obj[0]) == set(model.state_dict())


def test_width_mismatch_is_refused_with_both_widths(tmp_path, model):
    path = str(tmp_path / "ck.pkl")
    save_checkpoint(model, path)
    with pytest.raises(UserError, match=r"width-4 ResNet18.*--width 16"):
        load_model(path, width=16)
    assert load_model(path, width=4).width == 4


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, model):
    sd = dict(model.state_dict())
    del sd["layer3.1.bn2.weight"]
    sd["extra.weight"] = torch.zeros(1)
    sd["linear.bias"] = torch.zeros(7)
    path = str(tmp_path / "ck.pkl")
    torch.save([sd], path)
    with pytest.raises(UserError) as e:
        load_model(path)
    msg = str(e.value)
    assert "missing keys: layer3.1.bn2.weight" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "linear.bias: (7,) vs model (10,)" in msg


class Payload:
    """Unpickling this would create a file: the kind of checkpoint that must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, writer):
    """Our own line names the global, whatever torch's wording (which suggests weights_only=False)."""
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pkl")
    if writer == "torch.save":
        torch.save([Payload(marker)], path)
    else:
        with open(path, "wb") as f:
            pickle.dump([Payload(marker)], f)
    assert not os.path.exists(marker)
    with pytest.raises(UserError) as e:
        load_state_dict(path)
    assert str(e.value) == f"refused: unpickling {path} would call io.open; only tensors are loaded"
    assert "weights_only" not in str(e.value)
    assert not os.path.exists(marker)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(UserError, match="checkpoint file not found"):
        load_state_dict(str(tmp_path / "nope.pkl"))
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read"):
        load_state_dict(str(bad))
    torch.save({"a": 1}, str(tmp_path / "nosd.pkl"))
    with pytest.raises(UserError, match="holds no state dict"):
        load_state_dict(str(tmp_path / "nosd.pkl"))


def test_trigger_blend_and_threshold(tmp_path):
    x = torch.full((1, 3, 2, 2), 0.5)
    pattern = torch.ones(3, 2, 2)
    mask = torch.tensor([[[0.0, 0.2], [0.3, 1.0]]])
    out = apply_trigger(x, pattern, mask)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.5, 0.6], [0.65, 1.0]]))
    torch.testing.assert_close(threshold_mask(mask, 0.2), torch.tensor([[[0.0, 0.0], [0.3, 1.0]]]))


def test_load_trigger_checks_shapes(tmp_path):
    torch.save(torch.rand(3, 32, 32), str(tmp_path / "pattern.pt"))
    torch.save(torch.rand(3, 32, 32), str(tmp_path / "mask.pt"))
    with pytest.raises(UserError, match=r"mask.pt has shape \(3, 32, 32\), expected \(1, 32, 32\)"):
        load_trigger(str(tmp_path))
    torch.save(torch.rand(1, 32, 32), str(tmp_path / "mask.pt"))
    pattern, mask = load_trigger(str(tmp_path), thresh=0.5)
    assert pattern.shape == (3, 32, 32) and float(mask[mask > 0].min()) > 0.5
