"""The one training engine: an optimisation step, an epoch over batches, and the fit loop.

Every defense (``helper.defenses``) and the ADBA attack (``helper.attacks.adba``) train through these three
functions, so batching, accumulation with one host sync per epoch, the per-epoch JSON line, the
non-finite stop and the selection of the reported epoch exist once.
"""
import math
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from helper.data.images import augmented_batches
from helper.run import interrupt
from helper.run.runlog import append_jsonl

SHORT = {"kd_loss": "kd", "asr_nontarget": "asr_nt"}  # names in the printed epoch line
QUIET = {"epoch", "time_s", "top_class_share", "target_rate_clean", "target_acc", "conv_weight_norm", "stage", "phase",
         "diag"}


def optimizer_step(optimizer, loss, clip_norm=0.0):
    """``zero_grad``, ``backward``, ``step``: the one optimisation step of the package. ``clip_norm`` > 0
    scales the gradient of all the optimizer's parameters down to that total L2 norm when it is larger."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_norm)
    optimizer.step()


def run_epoch(step, batches):
    """Run ``step(*batch)`` over ``(batch, size)`` pairs; the size-weighted means of the named tensors it returns.

    ``step`` returns a dict of 0-d device tensors (a value may be None: then the key's mean is None).
    The sums stay on the device; the epoch ends in one host sync. Raises ``interrupt.Interrupted`` before the
    next step once a stop was asked for.
    """
    sums, n = {}, 0
    for batch, size in batches:
        interrupt.check()  # a Ctrl-C / SIGTERM stops between two steps (helper.run.interrupt)
        for key, value in step(*batch).items():
            if value is None:
                sums.setdefault(key, None)
            else:
                prev = sums.get(key)
                sums[key] = value.detach().float() * size + (prev if prev is not None else 0.0)
        n += size
    keys = [k for k, v in sums.items() if v is not None]
    means = (torch.stack([sums[k] for k in keys]) / max(n, 1)).tolist() if keys else []
    return {k: dict(zip(keys, means)).get(k) for k in sums}


def image_epoch(step, images, batch_size, generator, memory_format, progress=True):
    """``run_epoch`` over one augmented pass of unlabelled uint8 ``images`` (``data.augmented_batches``):
    ``step(x)`` per batch."""
    return run_epoch(step, (((x,), len(idx)) for x, idx in
                            augmented_batches(images, batch_size, generator, memory_format, progress)))


@dataclass
class Fit:
    """What ``fit`` leaves: every epoch's row, the selected row and the model's state then, and why it stopped."""
    rows: list = field(default_factory=list)
    best: dict = None
    best_state: dict = None
    stopped: str = None       # "non-finite loss at epoch E (keys)" or "interrupted"
    signum: int = None        # the signal that interrupted it


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def epoch_line(row, quiet=()):
    """``epoch   3  kd 0.0158  asl 2.3125  lr 1.0e-03  acc 0.1094 ...``: the printed form of a log row, without the
    keys of ``QUIET`` and ``quiet`` (a method's own: logged, not printed)."""
    parts = [f"{row.get('stage', '')} epoch {row['epoch']:3d}".strip()]
    for key, value in row.items():
        if key not in QUIET and key not in quiet:
            parts.append(f"{SHORT.get(key, key)} {f'{value:.1e}' if key == 'lr' else _fmt(value)}")
    return "  ".join(parts)


def fit(epochs, train_epoch, evaluate_epoch, log_path, select_key=None, select_from=0, state=None,
        progress=True, desc="epochs", out=tqdm.write, extra=None, result=None, after_epoch=None, quiet=()):
    """Train over the epoch numbers ``epochs`` (a range), top to bottom:

    1. ``train_epoch(epoch)`` trains one epoch and returns its means (and schedule values);
    2. ``evaluate_epoch(epoch)`` returns the metrics of the model after it;
    3. the row ``{epoch, **extra, **train means, **metrics}`` is appended to ``log_path`` and printed;
    4. a non-finite train mean stops the loop (``Fit.stopped`` says at which epoch; what was written stays);
    5. from ``select_from`` on, the row with the lowest ``select_key`` (the mean KD loss: a defender has no
       labelled data to select by accuracy) is kept, with ``state()`` of that moment;
    6. ``after_epoch(epoch, fit)`` (``--resume``'s ``last.pt``).

    ``quiet``: keys of the row that are logged but not printed (``epoch_line``).

    A stop asked for by a signal (``helper.run.interrupt``) ends the loop between two steps with ``stopped =
    "interrupted"``; the epoch under way is dropped (a resumed run does it again). ``result`` continues a
    ``Fit`` (its rows are not repeated in ``log_path``).
    """
    result = result or Fit()
    bar = tqdm(epochs, desc=desc, file=sys.stdout, disable=not progress)
    try:
        for epoch in bar:
            stats = train_epoch(epoch)
            row = {"epoch": epoch, **(extra or {}), **stats, **evaluate_epoch(epoch)}
            append_jsonl(log_path, row)
            result.rows.append(row)
            if out is not None:
                out(epoch_line(row, quiet))
            bad = [k for k, v in stats.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                result.stopped = f"non-finite loss at epoch {epoch} ({', '.join(bad)})"
                break
            if select_key is not None and epoch >= select_from and (
                    result.best is None or row[select_key] < result.best[select_key]):
                result.best = row
                result.best_state = state() if state is not None else None
            if after_epoch is not None:
                after_epoch(epoch, result)
    except interrupt.Interrupted as e:
        result.stopped, result.signum = "interrupted", e.signum
    finally:
        bar.close()
    return result
