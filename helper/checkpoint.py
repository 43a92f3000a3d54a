"""Reading and writing model checkpoints. Checkpoints are untrusted: every load is ``weights_only=True``."""
import os
import pickle
import re

import torch

from helper.errors import UserError
from models import resnet18


def _safe_load(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        detail = detail.group(1).strip().split(". ")[0] if detail else str(e).strip().split("\n")[0]
        if "Unsupported global" in detail:
            raise UserError(f"refused to load {path}: unpickling it would run code ({detail}); "
                            f"only plain tensors are accepted") from None
        raise UserError(f"cannot read {path} as a torch file: {detail}") from None
    except Exception as e:  # truncated or foreign file
        raise UserError(f"cannot read {path} as a torch file: {type(e).__name__}: {e}") from None


def load_tensor_file(path, what="tensor"):
    obj = _safe_load(path, what)
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"{path} should hold one tensor, found {type(obj).__name__}")
    return obj


def extract_state_dict(obj, path="checkpoint"):
    """Accept ADBA's ``[state_dict]``, ``{'state_dict': sd}``, or a bare state dict; strip ``module.``."""
    if isinstance(obj, (list, tuple)) and len(obj) >= 1 and isinstance(obj[0], dict):
        obj = obj[0]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict (expected a list holding one state dict, "
                        f"{{'state_dict': ...}} or a bare state dict)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_state_dict(path):
    return extract_state_dict(_safe_load(path, "checkpoint"), path)


def infer_arch(state_dict, path="checkpoint"):
    """(width, num_classes) of a ResNet18 state dict, read from its stem conv and linear head."""
    try:
        return int(state_dict["conv1.weight"].shape[0]), int(state_dict["linear.weight"].shape[0])
    except KeyError as e:
        raise UserError(f"{path} is not a CIFAR ResNet18 checkpoint: key {e.args[0]!r} is missing") from None


def build_from_state_dict(state_dict, width=None, path="checkpoint"):
    """A ResNet18 whose width and classes come from the checkpoint, loaded strictly.

    ``width`` given and different from the checkpoint's is refused; so is any missing, unexpected or
    mis-shaped key, with the keys named.
    """
    ck_width, num_classes = infer_arch(state_dict, path)
    if width is not None and width != ck_width:
        raise UserError(f"{path} is a width-{ck_width} ResNet18 (conv1.weight {tuple(state_dict['conv1.weight'].shape)}) "
                        f"but --width {width} was asked for; drop --width or pass --width {ck_width}")
    model = resnet18(num_classes=num_classes, width=ck_width)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise UserError(f"{path} does not fit a CIFAR ResNet18: " + "; ".join(parts))
    model.load_state_dict(state_dict)
    return model


def load_model(path, width=None):
    """Read a checkpoint file and build the model it holds."""
    return build_from_state_dict(load_state_dict(path), width, path)


def save_checkpoint(model, path):
    """Save as ADBA does: a list holding one state dict of CPU tensors."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save([state], path)
