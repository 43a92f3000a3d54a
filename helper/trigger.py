"""The ADBA trigger: ``x * (1 - m) + p * m`` (SPEC section 3), and reading it from a run folder."""
import os

import torch

from helper.errors import UserError
from helper.checkpoint import load_tensor_file

PATTERN_SHAPE = (3, 32, 32)
MASK_SHAPE = (1, 32, 32)


def apply_trigger(x, pattern, mask):
    """Blend a batch of [0,1] images (N,3,H,W) with the trigger: ``x * (1 - mask) + pattern * mask``."""
    return x * (1 - mask) + pattern * mask


def threshold_mask(mask, thresh=None):
    """Set mask values ``<= thresh`` to 0 (the ``--thresh_mask`` option); ``None`` leaves it unchanged."""
    if thresh is None:
        return mask
    return torch.where(mask <= thresh, torch.zeros_like(mask), mask)


def load_trigger(read_dir, thresh=None):
    """Read ``pattern.pt`` (3,32,32) and ``mask.pt`` (1,32,32) from a folder, as fp32 CPU tensors."""
    pattern = load_tensor_file(os.path.join(read_dir, "pattern.pt"), "pattern")
    mask = load_tensor_file(os.path.join(read_dir, "mask.pt"), "mask")
    for name, t, shape in (("pattern.pt", pattern, PATTERN_SHAPE), ("mask.pt", mask, MASK_SHAPE)):
        if tuple(t.shape) != shape:
            raise UserError(f"{os.path.join(read_dir, name)} has shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise UserError(f"{os.path.join(read_dir, name)} holds non-finite values")
    return pattern.float(), threshold_mask(mask.float(), thresh)


def save_trigger(out_dir, pattern, mask):
    torch.save(pattern.detach().cpu().clone(), os.path.join(out_dir, "pattern.pt"))
    torch.save(mask.detach().cpu().clone(), os.path.join(out_dir, "mask.pt"))
