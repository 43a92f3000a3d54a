"""A teacher folder, as ADBA writes it and every defense reads it: ``checkpoint.pkl`` (a list holding one
state dict), ``pattern.pt`` (3,32,32) and ``mask.pt`` (1,32,32). Every run folder is one too.

A clean teacher (``adba.py --attack none``) has no trigger files: a run measures it with another folder's trigger
(``--trigger_dir``). Which attack made a folder is its ``results.json``'s ``attack`` (``teacher_attack``).
"""
import json
import os

import torch

from helper.data.trigger import MASK_SHAPE, PATTERN_SHAPE, threshold_mask
from helper.run.checkpoint import load_model, load_tensor_file, save_checkpoint
from helper.run.errors import UserError
from helper.run.runlog import atomic_torch_save


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


TRIGGER_FILES = ("pattern.pt", "mask.pt")


def has_trigger(folder):
    """Whether a folder holds a trigger file (a clean teacher's holds neither)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in TRIGGER_FILES)


def find_trigger(read_dir, thresh=None, trigger_dir=None):
    """(pattern, mask) a teacher is measured with: ``trigger_dir``'s when given, else ``read_dir``'s own.

    A folder with neither trigger file (a clean teacher) and no ``trigger_dir`` is one UserError saying to pass
    ``--trigger_dir``; a folder with only one of them is the missing file's error.
    """
    if trigger_dir is not None:
        if not os.path.isdir(trigger_dir):
            raise UserError(f"--trigger_dir not found: {trigger_dir!r}")
        return load_trigger(trigger_dir, thresh)
    if not has_trigger(read_dir):
        raise UserError(f"{read_dir} holds no trigger (no pattern.pt, mask.pt: a clean teacher, adba.py --attack none?); "
                        f"pass --trigger_dir DIR, a teacher folder whose trigger the ASR is measured with")
    return load_trigger(read_dir, thresh)


def teacher_attack(folder):
    """The attack that made a teacher folder (``results.json``'s ``attack``: adba, badnets, blended, none), or None
    when it does not say (a folder from before ``--attack``, a defense run's folder, a foreign one)."""
    try:
        with open(os.path.join(folder, "results.json")) as f:
            attack = json.load(f).get("attack")
    except (OSError, ValueError, AttributeError):
        return None
    return attack if isinstance(attack, str) else None


def read_teacher(read_dir, width=None, thresh=None, trigger_dir=None):
    """(model, pattern, mask) of a teacher folder, the trigger ``trigger_dir``'s when given (``find_trigger``); a
    missing folder or file is one clear UserError."""
    if not read_dir or not os.path.isdir(read_dir):
        raise UserError(f"read_dir not found: {read_dir!r} (set read_dir at the top of distri.py or pass --read_dir)")
    model = load_model(os.path.join(read_dir, "checkpoint.pkl"), width)
    return (model, *find_trigger(read_dir, thresh, trigger_dir))


def write_teacher(out_dir, model, pattern, mask, checkpoint="checkpoint.pkl"):
    """Write ``model`` (ADBA's format) and the trigger: ``out_dir`` becomes a valid ``--read_dir``. A clean teacher
    (``pattern`` and ``mask`` None) gets the checkpoint alone."""
    save_checkpoint(model, os.path.join(out_dir, checkpoint))
    if pattern is not None:
        save_trigger(out_dir, pattern, mask)
