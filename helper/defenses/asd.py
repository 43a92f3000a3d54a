"""ASD, Attention Shifting Distillation (SPEC sections 4-6), and plain KD (``--ratio_type fix``, ``--defense kd``)."""
import functools

import torch

from helper.defenses.base import Defense
from helper.engine import optimizer_step
from helper.features import DEFAULT_LAYERS, FeatureHooks
from helper.losses import attention_shifting_loss, kd_loss
from helper.schedule import RATIO_TYPES, asd_ratio, loss_weights
from helper.system import CompiledOrEager, autocast


class Distiller:
    """Teacher, student, the hooks on both and the loss of one step; one object so the defense and bench.py share it.

    ``step(x, kd_weight, asl_weight)`` runs one optimisation step on a batch and returns ``{'kd_loss', 'asl'}``
    as device tensors (``asl`` None when its weight is 0, when it is not computed): no host sync.
    """

    def __init__(self, teacher, student, optimizer, layers, temperature=40.0, kd_reduction="mean", eps=0.1,
                 amp=None, compile_losses=False, asl_samples="all"):
        self.teacher, self.student, self.optimizer = teacher.eval(), student, optimizer
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.t_hooks = FeatureHooks(teacher, layers)
        self.s_hooks = FeatureHooks(student, layers)
        self.temperature, self.kd_reduction, self.eps, self.amp = temperature, kd_reduction, eps, amp
        # "first": ASL on sample 0 of each batch only, as the public code computes it (SPEC section 9).
        # "all" takes the features as they are: even a full slice ``x[:]`` would add a SliceBackward whose
        # gradient is a zero-filled contiguous copy, which costs a fill, a copy and a layout change per layer.
        self.first_sample_only = asl_samples == "first"
        self.asl_fn, self.kd_fn = attention_shifting_loss, kd_loss
        if compile_losses:  # ASL: its value-and-gradient kernel is compiled (one fused pass), not the autograd Function
            self.asl_fn = functools.partial(attention_shifting_loss, compiled=True)
            self.kd_fn = CompiledOrEager(kd_loss)

    def losses(self, x, with_asl=True):
        """Forward both models on ``x``; (KD loss, mean ASL over the hooked layers or None)."""
        self.t_hooks.enabled = self.s_hooks.enabled = with_asl
        with autocast(x.device, self.amp):
            with torch.no_grad():
                t_logits = self.teacher(x)
            s_logits = self.student(x)
        kd = self.kd_fn(s_logits, t_logits, self.temperature, self.kd_reduction)
        return kd, self.hooked_asl() if with_asl else None

    def hooked_asl(self):
        """Mean ASL over the hooked layers of the last forward of both models (their features are released)."""
        t_feats, s_feats = self.t_hooks.pop(), self.s_hooks.pop()
        if self.first_sample_only:
            t_feats = {n: f[:1] for n, f in t_feats.items()}
            s_feats = {n: f[:1] for n, f in s_feats.items()}
        layers = self.s_hooks.layers
        return sum(self.asl_fn(t_feats[n], s_feats[n], self.eps) for n in layers) / len(layers)

    def step(self, x, kd_weight, asl_weight):
        kd, asl = self.losses(x, with_asl=asl_weight != 0)
        optimizer_step(self.optimizer, kd_weight * kd + (asl_weight * asl if asl is not None else 0.0))
        return {"kd_loss": kd.detach(), "asl": None if asl is None else asl.detach()}

    def close(self):
        self.t_hooks.remove()
        self.s_hooks.remove()


class ASD(Defense):
    name = "asd"
    help = "Attention Shifting Distillation: KD plus ASL on every residual block's conv1 (--ratio_type fix: plain KD)"

    @classmethod
    def add_args(cls, g):
        g.add_argument("--ratio_type", default="scheduler", choices=RATIO_TYPES,
                       help="scheduler: ASD (lambda 0 -> 1 over epochs 0-40, loss x10/x20); "
                            "fix: main_loss_ratio*KD + new_loss_ratio*ASL (defaults = plain KD)")
        g.add_argument("--eps", type=float, default=0.1, help="ASL's eps where the teacher's neuron is exactly 0")
        g.add_argument("--asl_samples", default="all", choices=["all", "first"],
                       help="all: ASL over every sample of the batch (the paper's expectation); first: sample 0 of "
                            "each batch only, as the public code computes it, for comparison with its numbers")
        g.add_argument("--main_loss_ratio", type=float, default=1.0, help="KD weight with --ratio_type fix")
        g.add_argument("--new_loss_ratio", type=float, default=0.0, help="ASL weight with --ratio_type fix")
        g.add_argument("--hook_layers", default=",".join(DEFAULT_LAYERS),
                       help="comma-separated module names or globs whose outputs ASL compares "
                            "(the default matches conv1 of every residual block: 8 layers)")

    def stages(self, student):
        a = self.args
        optimizer = self.optimizer(student.parameters())
        layers = [s.strip() for s in a.hook_layers.split(",") if s.strip()]
        self.distiller = Distiller(self.teacher, student, optimizer, layers, a.temperature, a.kd_reduction, a.eps,
                                   self.amp, self.compile_losses, a.asl_samples)
        self.hooked_layers = self.distiller.s_hooks.layers
        weights = {}

        def begin(epoch):
            weights["kd"], weights["asl"] = loss_weights(epoch, a.ratio_type, a.main_loss_ratio, a.new_loss_ratio)
            return {"lambda": asd_ratio(epoch) if a.ratio_type == "scheduler" else None,
                    "kd_weight": weights["kd"], "asl_weight": weights["asl"]}

        def step(x):
            return self.distiller.step(x, weights["kd"], weights["asl"])
        return [self.make_stage("", a.epoch, student, optimizer, step, begin, drop=self.lr_drop_enabled)]

    def close(self):
        if hasattr(self, "distiller"):
            self.distiller.close()


class KD(ASD):
    name = "kd"
    help = "plain knowledge distillation: ASD's engine with --ratio_type fix (1 x KD + 0 x ASL)"
    defaults = {"ratio_type": "fix"}
