"""A teacher folder, as ADBA writes it and every defense reads it: ``checkpoint.pkl`` (a list holding one
state dict), ``pattern.pt`` (3,32,32) and ``mask.pt`` (1,32,32). Every run folder is one too."""
import os

import torch

from helper.checkpoint import load_model, load_tensor_file, save_checkpoint
from helper.errors import UserError
from helper.runlog import atomic_torch_save
from helper.trigger import MASK_SHAPE, PATTERN_SHAPE, threshold_mask


def load_trigger(read_dir, thresh=None):
    """Read ``pattern.pt`` (3,32,32) and ``mask.pt`` (1,32,32) from a folder, as fp32 CPU tensors."""
    pattern = load_tensor_file(os.path.join(read_dir, "pattern.pt"), "pattern")
    mask = load_tensor_file(os.path.join(read_dir, "mask.pt"), "mask")
    for name, t, shape in (("pattern.pt", pattern, PATTERN_SHAPE), ("mask.pt", mask, MASK_SHAPE)):
        if tuple(t.shape) != shape:
            raise UserError(f"{os.path.join(read_dir, name)} has shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise UserError(f"{os.path.join(read_dir, name)} holds non-finite values")
        if t.min() < 0 or t.max() > 1:
            raise UserError(f"{os.path.join(read_dir, name)} holds values in [{t.min().item():.4g}, {t.max().item():.4g}]; "
                            f"a trigger's pattern and mask lie in [0, 1]")
    thresholded = threshold_mask(mask.float(), thresh)
    if thresh is not None and mask.max() > 0 and thresholded.max() == 0:
        raise UserError(f"--thresh_mask {thresh} removes the whole mask (its largest value is {mask.max().item():.4g}): "
                        f"no trigger would be left to measure")
    return pattern.float(), thresholded


def save_trigger(out_dir, pattern, mask):
    atomic_torch_save(pattern.detach().cpu().clone(), os.path.join(out_dir, "pattern.pt"))
    atomic_torch_save(mask.detach().cpu().clone(), os.path.join(out_dir, "mask.pt"))


def read_teacher(read_dir, width=None, thresh=None):
    """(model, pattern, mask) of a teacher folder; a missing folder or file is one clear UserError."""
    if not read_dir or not os.path.isdir(read_dir):
        raise UserError(f"read_dir not found: {read_dir!r} (set read_dir at the top of distri.py or pass --read_dir)")
    model = load_model(os.path.join(read_dir, "checkpoint.pkl"), width)
    return (model, *load_trigger(read_dir, thresh))


def write_teacher(out_dir, model, pattern, mask, checkpoint="checkpoint.pkl"):
    """Write ``model`` (ADBA's format) and the trigger: ``out_dir`` becomes a valid ``--read_dir``."""
    save_checkpoint(model, os.path.join(out_dir, checkpoint))
    save_trigger(out_dir, pattern, mask)
