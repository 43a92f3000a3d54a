"""The ADBA trigger: ``x * (1 - m) + p * m`` (SPEC section 3); reading it from a folder is ``helper.data.teacher_dir``."""
import torch

PATTERN_SHAPE = (3, 32, 32)
MASK_SHAPE = (1, 32, 32)
TRIGGER_PIXEL = 0.01  # a mask pixel above this counts as part of the trigger


def apply_trigger(x, pattern, mask):
    """Blend a batch of [0,1] images (N,3,H,W) with the trigger: ``x * (1 - mask) + pattern * mask``."""
    return x * (1 - mask) + pattern * mask


def threshold_mask(mask, thresh=None):
    """Set mask values ``<= thresh`` to 0 (the ``--thresh_mask`` option); ``None`` leaves it unchanged."""
    if thresh is None:
        return mask
    return torch.where(mask <= thresh, torch.zeros_like(mask), mask)
