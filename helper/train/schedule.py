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
    """Drop the learning rate to ``to_lr`` once, at the end of the first *armed* epoch whose mean KD loss is at most
    ``threshold`` (SPEC section 6: the lr drops "once the value of L_KD reaches 1.0").

    The student starts as the teacher, so its KD loss starts far below the threshold: reaching it means coming
    back down to it. The drop is armed by an epoch whose mean KD loss was above ``threshold``, or from epoch
    ``arm_epoch`` on (ASD: the end of its ASL-only shift phase; measured, ASD's KD loss at T 40 stayed below 1.0
    even with a collapsed student, docs/method.md). With an ``arm_epoch``, nothing before it counts: an epoch above
    the threshold during the shift neither arms the drop nor lets a later dip drop the lr before ``arm_epoch``.
    ``dropped_at`` is the epoch of the drop; a run that is never armed (plain KD, whose loss stays below) keeps its lr.
    """

    def __init__(self, optimizer, threshold=1.0, to_lr=1e-4, enabled=True, arm_epoch=None):
        self.optimizer, self.threshold, self.to_lr, self.enabled = optimizer, threshold, to_lr, enabled
        self.arm_epoch = arm_epoch
        self.armed, self.dropped_at = False, None

    def step(self, epoch, kd_mean):
        """Record an epoch's mean KD loss; True when the lr was dropped at its end."""
        if not self.enabled or self.dropped_at is not None:
            return False
        if self.arm_epoch is not None and epoch < self.arm_epoch:
            return False  # the shift phase: nothing arms the drop yet
        if kd_mean > self.threshold:
            self.armed = True
            return False
        if self.armed or (self.arm_epoch is not None and epoch >= self.arm_epoch):
            self.armed = True
            for group in self.optimizer.param_groups:
                group["lr"] = self.to_lr
            self.dropped_at = epoch
            return True
        return False

    def state(self):
        """What ``--resume`` keeps: ``{"armed": bool, "dropped_at": epoch or None}``."""
        return {"armed": self.armed, "dropped_at": self.dropped_at}

    def restore(self, state):
        """Take back ``state()``; a bare epoch-or-None (the last.pt of older versions) is a drop already done or not."""
        if not isinstance(state, dict):
            state = {"armed": state is not None, "dropped_at": state}
        self.armed, self.dropped_at = bool(state["armed"]), state["dropped_at"]

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]


def cosine_lr(base_lr, epoch, epochs):
    """Cosine annealing per epoch (``CosineAnnealingLR`` with ``T_max = epochs``, eta_min 0):
    ``base * (1 + cos(pi * epoch / epochs)) / 2``. Past ``epochs`` it rises again, as PyTorch's does."""
    return base_lr * (1 + math.cos(math.pi * epoch / max(epochs, 1))) / 2


def step_lr(base_lr, epoch, milestones, gamma):
    """``MultiStepLR``: ``base * gamma ** (number of milestones <= epoch)`` (ABD: x0.5 at 150, 300 and 600)."""
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)


def bcu_temperature(epoch, epochs, start=1.0, end=4.0):
    """BCU's rising distillation temperature: ``start + (end - start) * (epoch + 1) / epochs`` (1 + 3 (e+1)/E)."""
    return start + (end - start) * (epoch + 1) / max(epochs, 1)
