"""The weight schedule of ASD and the learning-rate drop (SPEC sections 5 and 6)."""
import math

RATIO_TYPES = ("scheduler", "fix")


def asd_ratio(epoch, shift_epochs=10, floor=0.0):
    """lambda of ``L = lambda * KD + (1 - lambda) * ASL`` at a 0-based epoch ("scheduler" mode).

    The paper's schedule (``shift_epochs`` 10): 0 for epochs 0-9, 0.9 for 10-19, linear from 0.9 to 1.0
    over 20-40, 1 from 40 on: piecewise-linear through (0,0) (10,0) (10,0.9) (20,0.9) (40,1.0).
    ``shift_epochs = S`` moves every point after the first by ``S - 10`` (S = 0: no ASL-only phase);
    ``floor`` is the lowest lambda: ``max(lambda, floor)`` (a KD weight kept during the shift phase).
    """
    e = epoch - shift_epochs
    lam = 0.0 if e < 0 else 0.9 if e < 10 else 0.9 + 0.1 * (e - 10) / 20 if e < 30 else 1.0
    return max(lam, floor)


def loss_weights(epoch, ratio_type, main_loss_ratio=1.0, new_loss_ratio=0.0, shift_epochs=10, floor=0.0,
                 asl_scale=1.0):
    """(kd weight, asl weight) of the total loss at an epoch, the loss multiplier folded in.

    "scheduler": (lambda, asl_scale * (1 - lambda)) times 10 before epoch ``shift_epochs + 10`` and 20
    after (the public code's multiplier, a learning-rate factor under SGD; 10 before epoch 20 with the
    paper's schedule). "fix": (main_loss_ratio, asl_scale * new_loss_ratio), multiplier 1; the defaults
    1 and 0 are plain KD.
    """
    if ratio_type == "scheduler":
        lam = asd_ratio(epoch, shift_epochs, floor)
        multiplier = 10.0 if epoch < shift_epochs + 10 else 20.0
        return lam * multiplier, asl_scale * (1.0 - lam) * multiplier
    if ratio_type == "fix":
        return float(main_loss_ratio), asl_scale * float(new_loss_ratio)
    raise ValueError(f"ratio_type must be one of {RATIO_TYPES}, not {ratio_type!r}")


class LrDrop:
    """Drop the learning rate to ``to_lr`` once, after the first epoch whose mean KD loss is <= ``threshold``."""

    def __init__(self, optimizer, threshold=1.0, to_lr=1e-4, enabled=True):
        self.optimizer, self.threshold, self.to_lr, self.enabled = optimizer, threshold, to_lr, enabled
        self.dropped_at = None

    def step(self, epoch, kd_mean):
        if self.enabled and self.dropped_at is None and kd_mean <= self.threshold:
            for group in self.optimizer.param_groups:
                group["lr"] = self.to_lr
            self.dropped_at = epoch
            return True
        return False

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]


def cosine_lr(base_lr, epoch, epochs):
    """Cosine annealing per epoch (``CosineAnnealingLR`` with ``T_max = epochs``, eta_min 0):
    ``base * (1 + cos(pi * epoch / epochs)) / 2``."""
    return base_lr * (1 + math.cos(math.pi * epoch / max(epochs, 1))) / 2


def bcu_temperature(epoch, epochs, start=1.0, end=4.0):
    """BCU's rising distillation temperature: ``start + (end - start) * (epoch + 1) / epochs`` (1 + 3 (e+1)/E)."""
    return start + (end - start) * (epoch + 1) / max(epochs, 1)
