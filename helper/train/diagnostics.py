"""What happens inside the student while a defense trains it, per epoch (SPEC section 11): dead units,
the states ASL compares, and which channels clean data leaves off.

All functions run the model in eval mode (running batch-norm statistics: what the test-time network
computes) and leave its train/eval mode as they found it. The table of a run's logged diagnostics is
``python -m helper.report.diagnostics``.
"""
import math

import torch

from helper.data.images import to_float
from helper.train.evaluate import eval_mode
from helper.train.features import FeatureHooks


def unit_bns(model):
    """``{unit name: module name of its batch-norm}`` for the batch-norms whose output goes through a ReLU by
    itself: the stem's ``bn1`` ("stem") and the ``bn1`` of every residual block (``layer1.0`` ...). ``bn2`` is
    summed with the shortcut first."""
    bns = {"stem": "bn1"} if isinstance(getattr(model, "bn1", None), torch.nn.BatchNorm2d) else {}
    for name, module in model.named_modules():
        if name.startswith("layer") and name.endswith(".bn1") and isinstance(module, torch.nn.BatchNorm2d):
            bns[name[:-4]] = name
    return bns


def _outputs(model, names, x):
    """Forward ``x`` without gradient; ``{module name: its output}`` (``FeatureHooks``)."""
    with FeatureHooks(model, list(dict.fromkeys(names))) as hooks, torch.no_grad():
        model(x)
        return hooks.pop()


def dead_units(model, x):
    """Share of dead channels per unit: a channel is dead when ``relu(bn(.))`` is 0 at every position of
    every image of ``x`` (float images). ``{"stem": share, "layer1.0": share, ...}``."""
    units = unit_bns(model)
    with eval_mode(model):
        outs = _outputs(model, units.values(), x)
    return {u: (outs[n].amax(dim=(0, 2, 3)) <= 0).float().mean().item() for u, n in units.items()}


def asl_states(t, s):
    """Shares of the four cases ASL tells apart, over all elements of teacher/student features ``t``, ``s``
    (active = positive, dormant = not positive): ``aa`` both active and ``dd`` both dormant (ASL 4 there,
    pushing the student to the other state), ``ad`` teacher active and student dormant, ``da`` the reverse
    (ASL 0: no push)."""
    ta, sa = t > 0, s > 0
    n = t.numel()
    return {"aa": (ta & sa).sum().item() / n, "dd": (~ta & ~sa).sum().item() / n,
            "ad": (ta & ~sa).sum().item() / n, "da": (~ta & sa).sum().item() / n}


def activity_module(model, layer):
    """The name of the module whose ReLU'd output says whether the hooked ``layer``'s channels are active: the
    batch-norm after a block's ``conv1`` (``layer1.0.conv1`` -> ``layer1.0.bn1``) when there is one, else ``layer``."""
    modules = dict(model.named_modules())
    if layer.endswith("conv1") and isinstance(modules.get(layer[:-5] + "bn1"), torch.nn.BatchNorm2d):
        return layer[:-5] + "bn1"
    return layer


def channel_activity(model, images, layers, batch_size=500):
    """Mean ReLU'd activation per channel of each hooked layer (``activity_module``) on uint8 ``images``
    (N,3,32,32), no augmentation: ``{layer: (C,) tensor}``. Fine-Pruning's score: backdoor channels are
    the ones clean data leaves least active."""
    modules = {n: activity_module(model, n) for n in layers}
    sums, count = {}, 0
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            outs = _outputs(model, modules.values(), to_float(images[i:i + batch_size]))
            for n, m in modules.items():
                sums[n] = sums.get(n, 0) + outs[m].float().clamp_min(0).mean(dim=(2, 3)).sum(0)
            count += min(batch_size, len(images) - i)
    return {n: v / count for n, v in sums.items()}


def least_active(activity, fraction):
    """``{layer: sorted indices of the ceil(fraction x C) least active channels}`` (at least one per layer;
    ties go to the lower index)."""
    chosen = {}
    for n, a in activity.items():
        k = max(1, min(len(a), math.ceil(round(fraction * len(a), 6))))
        order = torch.sort(a.cpu(), stable=True).indices
        chosen[n] = torch.sort(order[:k]).values.to(a.device)
    return chosen
