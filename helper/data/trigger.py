"""The ADBA trigger: ``x * (1 - m) + p * m`` (SPEC section 3), and what it does to images (``trigger_stats``: mask
size, PSNR, SSIM; ``trigger_vanished``, ``inert_trigger_warning``); reading it from a folder is
``helper.data.teacher_dir``."""
import math

import torch

from helper.data.images import to_float
from helper.data.metrics import psnr_per_image, ssim

PATTERN_SHAPE = (3, 32, 32)
MASK_SHAPE = (1, 32, 32)
TRIGGER_PIXEL = 0.01  # a mask pixel above this counts as part of the trigger
# the generator of a poisoned subset (the attacks' training sets, the re-tuning set): --seed + this, never the run's
# own batch order (--seed)
POISON_SEED_OFFSET = 1_000_003


def apply_trigger(x, pattern, mask):
    """Blend a batch of [0,1] images (N,3,H,W) with the trigger: ``x * (1 - mask) + pattern * mask``."""
    return x * (1 - mask) + pattern * mask


def threshold_mask(mask, thresh=None):
    """Set mask values ``<= thresh`` to 0 (the ``--thresh_mask`` option); ``None`` leaves it unchanged."""
    if thresh is None:
        return mask
    return torch.where(mask <= thresh, torch.zeros_like(mask), mask)


def trigger_vanished(stats, vanish_psnr=50.0):
    """True when no mask pixel exceeds ``TRIGGER_PIXEL`` or triggered test images are within ``vanish_psnr`` dB of clean.

    Both say the same thing: the triggered image equals the clean one, so an "ASR" measured with it
    is only the model's bias toward the target class. (PSNR 50 dB is a mean squared change of 1e-5,
    e.g. one pixel moved by a third of the range; the paper's trigger has 24.46 dB.)
    """
    p = stats["psnr"]
    return stats["mask_share"] == 0 or p is None or not math.isfinite(p) or p >= vanish_psnr


INERT_ASR = 0.2  # a teacher whose own ASR non-target is below this carries no backdoor a defense could remove


def inert_trigger_warning(asr_nontarget, stats, attack=None, vanish_psnr=50.0):
    """The warning a defense run gives before training when its teacher's backdoor is no test of removal, or None:
    the teacher's ASR non-target is below ``INERT_ASR`` or the trigger has vanished (``trigger_vanished``:
    triggered test images within ``vanish_psnr`` dB of clean ones). ``attack`` 'none' (a clean teacher) names the
    cause."""
    reasons = []
    if asr_nontarget < INERT_ASR:
        reasons.append(f"the teacher's ASR non-target is {asr_nontarget:.3f} (below {INERT_ASR})")
    if trigger_vanished(stats, vanish_psnr):
        p = stats["psnr"]
        reasons.append(f"triggered test images are {p:.1f} dB from clean ones (>= {vanish_psnr:g} dB)"
                       if p is not None and p >= vanish_psnr else f"no mask pixel is above {TRIGGER_PIXEL}")
    if not reasons:
        return None
    cause = ("the teacher is a clean model, adba.py --attack none: its ASR is the floor, not a backdoor"
             if attack == "none" else "a teacher from a short or failed attack run is the usual cause")
    return f"{' and '.join(reasons)}: the run's ASR says nothing about removal ({cause})"


@torch.no_grad()
def trigger_stats(pattern, mask, clean, vanish_psnr=50.0, chunk=1000, with_ssim=True):
    """Mask L1 (sum), max and share of pixels above 0.01; PSNR and SSIM between ``clean`` (uint8) and triggered.

    PSNR is the mean over the images the trigger changes (as ``metrics.psnr``; inf when it changes none, e.g. an
    all-zero mask), SSIM the mean over all of ``clean`` (chunked: batch means weighted by batch size). ``vanished`` applies ``trigger_vanished``. ``with_ssim=False``
    leaves SSIM out (None): on 10,000 images it takes the CPU most of a minute, PSNR a second.
    """
    pattern, mask = pattern.detach().float(), mask.detach().float()
    stats = {"mask_l1": mask.abs().sum().item(), "mask_max": mask.max().item(),
             "mask_share": (mask > TRIGGER_PIXEL).float().mean().item()}
    total_p = total_s = 0.0
    n, n_changed = len(clean), 0
    for i in range(0, n, chunk):
        x = to_float(clean[i:i + chunk])
        xt = apply_trigger(x, pattern.to(x.device), mask.to(x.device)).clamp_(0, 1)
        values = psnr_per_image(x, xt)
        changed = values[values.isfinite()]  # pairs the trigger changes (``psnr``: identical ones are left out)
        total_p, n_changed = total_p + changed.sum().item(), n_changed + len(changed)
        total_s += ssim(x, xt) * len(x) if with_ssim else 0.0
    stats["psnr"] = (total_p / n_changed if n_changed else math.inf) if n else float("nan")
    stats["ssim"] = (total_s / n if n else float("nan")) if with_ssim else None
    stats["vanished"] = trigger_vanished(stats, vanish_psnr)
    return stats


def poisoned_labels(labels, index, target):
    """``(labels with those at index set to target, a bool flag per image: stamp the trigger)``; new tensors."""
    new, stamp = labels.clone(), torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    new[index], stamp[index] = int(target), True
    return new, stamp
