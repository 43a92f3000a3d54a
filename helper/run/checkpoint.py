"""Reading and writing model checkpoints. Checkpoints are untrusted: every load is ``weights_only=True``."""
import os
import pickle
import pickletools
import re
import zipfile

import torch

from helper.run.errors import UserError
from helper.run.runlog import atomic_torch_save
from models import resnet18

SAFE_MODULES = ("torch", "collections", "builtins", "_codecs")  # what a file of plain tensors refers to


def pickle_globals(path):
    """The ``module.name`` globals a pickle file (or a ``torch.save`` zip's ``data.pkl``) would import, in order,
    and whether the whole stream parsed as a pickle.

    Read with ``pickletools`` (nothing is executed): ``GLOBAL`` carries its name, ``STACK_GLOBAL`` takes the two
    strings pushed before it.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            data = z.read(names[0]) if names else b""
    else:
        with open(path, "rb") as f:
            data = f.read()
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a truncated or foreign stream: report what was found before it
        return found, False
    return found, True


def safe_load(path, what):
    """``torch.load(path, weights_only=True)`` on the CPU; anything else is one UserError naming the file.

    A file that would import code when unpickled is refused with the global it names, whatever torch's
    wording (its own message suggests ``weights_only=False``, the one thing not to do here).
    """
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe, truncated or foreign file
        found, parsed = pickle_globals(path)
        unsafe = [g for g in found if not g.startswith(SAFE_MODULES)]
        if unsafe:
            raise UserError(f"refused: unpickling {path} would call {unsafe[0]}; only tensors are loaded") from None
        if parsed and isinstance(e, pickle.UnpicklingError):
            raise UserError(f"refused: {path} holds more than tensors (torch's weights-only reader stopped: "
                            f"{_first_reason(e)}); only tensors are loaded") from None
        raise UserError(f"cannot read {path} as a torch file: {type(e).__name__}: {e}") from None


def _first_reason(error):
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error)) or re.search(r"(Trying to load .+?\.)", str(error))
    return detail.group(1).strip().split(". ")[0] if detail else str(error).strip().split("\n")[0][:200]


def load_tensor_file(path, what="tensor"):
    obj = safe_load(path, what)
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
    return extract_state_dict(safe_load(path, "checkpoint"), path)


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
    atomic_torch_save([state], path)
