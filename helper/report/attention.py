"""Where a model looks: the attention maps of its residual groups, on clean and triggered test images.

For a feature ``F`` (N, C, H, W) the attention map is ``A(F) = sum over channels of |F_c|^2`` (N, H, W), taken at
the output of each residual group ``layer1`` .. ``layer4`` of the ResNet18 in ``models/``. ASD's claim is about
these maps: a backdoored model's attention sits on the trigger, a cleaned one's on the object.

Two products, both written by every defense run at its end from its selected student (``write_run_attention``):

- ``attention.png``: a few test images (the first of each of the first 4 non-target classes), clean and
  triggered, with the maps of the teacher's and the student's four groups over them;
- ``attention.json``: per model and group, the mean attention inside and outside the trigger's mask on 256
  non-target test images, clean and triggered (``mask_region_means`` has the formula).

``python -m helper.report.figures attention RUN ...`` draws several runs of one teacher side by side.
"""
import copy
import os
import time

import torch
import torch.nn.functional as F

from helper.data.images import to_float
from helper.data.trigger import TRIGGER_PIXEL, apply_trigger
from helper.report.plot import plot_attention
from helper.run.runlog import write_json
from helper.train.evaluate import eval_mode
from helper.train.features import FeatureHooks
from helper.train.losses import raw_attention_map

GROUPS = ("layer1", "layer2", "layer3", "layer4")
IMAGE_SIZE = 32
PICTURE_IMAGES = 4    # images in attention.png (each clean and triggered)
SUMMARY_IMAGES = 256  # images behind attention.json's numbers


def attention_map(feature):
    """``A(F) = sum over channels of |F_c|^2`` of a (N, C, H, W) feature: (N, H, W), fp32, not normalised.

    (``helper.train.losses.raw_attention_map`` with p = 2; NAD's loss uses the same map, L2-normalised.)
    """
    return raw_attention_map(feature, 2.0)


def upsample(maps, size=IMAGE_SIZE):
    """(N, h, w) maps to (N, size, size), bilinear (``align_corners=False``)."""
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def unit_range(maps):
    """Each (H, W) map of (N, H, W) stretched to [0, 1] by its own min and max (a constant map becomes 0)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    return ((flat - lo) / torch.where(span > 0, span, torch.ones_like(span))).view_as(maps)


def has_groups(model):
    """Whether ``model`` has the four residual groups ``layer1`` .. ``layer4`` whose outputs are mapped."""
    return all(isinstance(getattr(model, g, None), torch.nn.Module) for g in GROUPS)


@torch.inference_mode()
def group_attention(model, images, batch_size=256, size=IMAGE_SIZE):
    """``{group: (N, size, size)}``: the attention map of each group's output, upsampled (bilinear), on the CPU.

    ``images`` are float (N, 3, 32, 32) in [0, 1] on any device; they go to the model's device in batches,
    through the model in eval mode and fp32; its train/eval mode is restored afterwards.
    """
    device = next(model.parameters()).device
    maps = {g: [] for g in GROUPS}
    hooks = FeatureHooks(model, GROUPS)
    try:
        with eval_mode(model):
            for i in range(0, len(images), batch_size):
                model(images[i:i + batch_size].to(device).float())
                features = hooks.pop()
                for g in GROUPS:
                    maps[g].append(upsample(attention_map(features[g]), size).cpu())
    finally:
        hooks.remove()
    return {g: torch.cat(m) if m else torch.zeros(0, size, size) for g, m in maps.items()}


def trigger_region(mask):
    """The pixels of a (1, H, W) mask that belong to the trigger: (H, W) bool, ``mask > TRIGGER_PIXEL`` (0.01)."""
    return mask.detach().float().cpu()[0] > TRIGGER_PIXEL


def mask_region_means(maps, inside):
    """Mean attention inside and outside the trigger's pixels, scale-free, averaged over images.

    Each image's map ``U`` (H, W) is divided by its own mean over all pixels, ``U / mean(U)``, so a map
    spread evenly is 1 everywhere whatever the model's scale; then

        inside  = mean over images and over pixels with ``inside`` of ``U / mean(U)``
        outside = the same over the other pixels
        inside_over_outside = inside / outside

    With ``a`` the share of pixels inside, ``a * inside + (1 - a) * outside = 1``: inside > 1 means the map
    puts more than its share on the trigger. Images whose map is 0 everywhere (a dead group) are left out
    (``n_images`` counts the rest). When the region is empty or covers every pixel, or no image is left,
    the three numbers are None and ``reason`` says why.
    """
    inside = inside.bool()
    k, total = int(inside.sum()), inside.numel()
    mean = maps.flatten(1).mean(1)
    valid = torch.isfinite(mean) & (mean > 0)
    result = {"inside": None, "outside": None, "inside_over_outside": None, "n_images": int(valid.sum())}
    if k == 0:
        return {**result, "reason": f"the mask has no pixel above {TRIGGER_PIXEL}: there is no inside"}
    if k == total:
        return {**result, "reason": f"every mask pixel is above {TRIGGER_PIXEL}: there is no outside"}
    if not valid.any():
        return {**result, "reason": "every map is 0 everywhere: the group's output is dead on these images"}
    u = maps[valid] / mean[valid, None, None]
    inner, outer = u[:, inside].mean().item(), u[:, ~inside].mean().item()
    return {**result, "inside": inner, "outside": outer, "inside_over_outside": inner / outer if outer > 0 else None}


def picture_indices(labels, target, n=PICTURE_IMAGES):
    """Indices of the first test image of each of the first ``n`` classes other than ``target``, in class order."""
    labels = labels.cpu()
    chosen = []
    for c in sorted(int(v) for v in labels.unique()):
        if c != target and len(chosen) < n:
            chosen.append(int((labels == c).nonzero()[0]))
    return chosen


def summary_indices(labels, target, n=SUMMARY_IMAGES):
    """Indices of the first ``n`` test images whose label is not ``target``."""
    return (labels.cpu() != target).nonzero().flatten()[:n].tolist()


def clean_and_triggered(split, indices, pattern, mask):
    """Float [0, 1] images of ``split`` at ``indices`` (CPU), and the same with the trigger applied."""
    x = to_float(split.x[torch.as_tensor(indices, dtype=torch.long)].cpu())
    return x, apply_trigger(x, pattern.detach().float().cpu(), mask.detach().float().cpu()).clamp(0, 1)


def attention_summary(models, clean, triggered, inside):
    """``{model name: {group: {'clean': mask_region_means, 'triggered': ...}}}`` over float image batches."""
    out = {}
    for name, model in models.items():
        maps_clean, maps_trig = group_attention(model, clean), group_attention(model, triggered)
        out[name] = {g: {"clean": mask_region_means(maps_clean[g], inside),
                         "triggered": mask_region_means(maps_trig[g], inside)} for g in GROUPS}
    return out


def interleave(clean, triggered):
    """(2N, ...) with clean image i at row 2i and its triggered copy at row 2i + 1."""
    return torch.stack([clean, triggered], 1).flatten(0, 1)


def picture_rows(split, indices, pattern, mask):
    """The rows of an attention figure: images (2N, 3, 32, 32), clean and triggered in turns, their labels, and
    which rows carry the trigger."""
    clean, trig = clean_and_triggered(split, indices, pattern, mask)
    labels = [f"#{i} class {int(split.y[i])}\n{kind}" for i in indices for kind in ("clean", "triggered")]
    return interleave(clean, trig), labels, [kind == "triggered" for _ in indices for kind in ("clean", "triggered")]


def write_run_attention(out_dir, teacher, student, state, split, pattern, mask, target, out=print,
                        n_picture=PICTURE_IMAGES, n_summary=SUMMARY_IMAGES):
    """Write ``attention.png`` and ``attention.json`` of a finished run into ``out_dir``; returns the json's dict.

    ``student`` is the trained model; ``state`` the selected state dict to load into a copy of it (None: the
    student as it is). ``split`` is the teacher's test set. Skipped with one line when a model has no
    ``layer1`` .. ``layer4``, or when drawing fails (a figure never costs a run its results).
    """

    if not (has_groups(teacher) and has_groups(student)):
        out("attention maps skipped: the models have no residual groups layer1..layer4")
        return None
    try:
        start = time.time()
        if state is not None:
            student = copy.deepcopy(student)
            student.load_state_dict(state)
        inside = trigger_region(mask)
        idx = summary_indices(split.y, target, n_summary)
        clean, trig = clean_and_triggered(split, idx, pattern, mask)
        models = {"teacher": teacher, "student": student}
        summary = {"formula": "A = sum_c |F_c|^2 at the output of each group, upsampled to 32x32 (bilinear), "
                              "divided by its own mean over the 1024 pixels; inside/outside = mean over images "
                              "and over mask pixels > 0.01 / the other pixels",
                   "groups": list(GROUPS), "mask_threshold": TRIGGER_PIXEL, "mask_pixels_inside": int(inside.sum()),
                   "target_label": int(target), "student_state": "selected" if state is not None else "final",
                   "n_images": len(idx), "indices": idx, "picture_indices": picture_indices(split.y, target, n_picture),
                   **attention_summary(models, clean, trig, inside)}
        images, row_labels, outlined = picture_rows(split, summary["picture_indices"], pattern, mask)
        drawn = {name: group_attention(model, images) for name, model in models.items()}
        columns = [(f"{name}\n{g}", unit_range(drawn[name][g])) for name in models for g in GROUPS]
        plot_attention(images, row_labels, columns, os.path.join(out_dir, "attention.png"), inside, outlined,
                       title=f"attention A = sum_c |F|^2 of each residual group (test images, target {target} left out)",
                       separators=(len(GROUPS),))
        write_json(os.path.join(out_dir, "attention.json"), summary)
    except Exception as e:  # noqa: BLE001 - an auxiliary figure; the run's results come first
        out(f"attention maps not written: {type(e).__name__}: {e}")
        return None
    out(f"attention maps: attention.png, attention.json ({time.time() - start:.1f} s)")
    return summary
