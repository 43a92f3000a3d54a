"""ASD, Attention Shifting Distillation (SPEC sections 4-6), and plain KD (``--ratio_type fix``, ``--defense kd``)."""
import functools

import torch

from helper.defenses.base import Defense, register_defense
from helper.run.cli import NONNEGATIVE, UNIT, Option, Range
from helper.run.system import CompiledOrEager, autocast
from helper.train.diagnostics import asl_states, channel_activity, least_active
from helper.train.engine import optimizer_step
from helper.train.evaluate import eval_mode
from helper.train.features import DEFAULT_LAYERS, FeatureHooks, resolve_layers
from helper.train.losses import attention_shifting_loss, kd_loss, mean_attention_shifting_loss
from helper.train.schedule import RATIO_TYPES, asd_ratio, loss_weights


class Distiller:
    """Teacher, student, the hooks on both and the loss of one step; one object so the defense and bench.py share it.

    ``step(x, kd_weight, asl_weight)`` runs one optimisation step on a batch and returns ``{'kd_loss', 'asl'}``
    as device tensors (``asl`` None when its weight is 0, when it is not computed): no host sync.
    """

    def __init__(self, teacher, student, optimizer, layers, temperature=40.0, kd_reduction="mean", eps=0.1,
                 amp=None, compile_losses=False, asl_samples="all", channels=None, clip_norm=0.0, local=False):
        self.teacher, self.student, self.optimizer = teacher.eval(), student, optimizer
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.t_hooks = FeatureHooks(teacher, layers)
        self.s_hooks = FeatureHooks(student, layers, local)
        self.temperature, self.kd_reduction, self.eps, self.amp = temperature, kd_reduction, eps, amp
        # "first": ASL on sample 0 of each batch only, as the public code computes it (SPEC section 9).
        # "all" takes the features as they are: even a full slice ``x[:]`` would add a SliceBackward whose
        # gradient is a zero-filled contiguous copy, which costs a fill, a copy and a layout change per layer.
        self.first_sample_only = asl_samples == "first"
        # ``channels``: {layer: channel indices} ASL is restricted to (--shift dormant); None: every channel
        self.channels, self.clip_norm = channels, clip_norm
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

    def asl_features(self):
        """The teacher's and student's features ASL compares, from the last forward of both models
        (released from the hooks): sample 0 only with ``asl_samples="first"``, ``channels`` only if given."""
        t_feats, s_feats = self.t_hooks.pop(), self.s_hooks.pop()
        if self.first_sample_only:
            t_feats = {n: f[:1] for n, f in t_feats.items()}
            s_feats = {n: f[:1] for n, f in s_feats.items()}
        if self.channels is not None:
            t_feats = {n: f.index_select(1, self.channels[n]) for n, f in t_feats.items()}
            s_feats = {n: f.index_select(1, self.channels[n]) for n, f in s_feats.items()}
        return t_feats, s_feats

    def hooked_asl(self, feats=None):
        """Mean ASL over the hooked layers of ``asl_features()`` (or of the given pair of feature dicts)."""
        t_feats, s_feats = feats or self.asl_features()
        return mean_attention_shifting_loss(t_feats, s_feats, self.eps, self.s_hooks.layers, self.asl_fn)

    def step(self, x, kd_weight, asl_weight):
        kd, asl = self.losses(x, with_asl=asl_weight != 0)
        optimizer_step(self.optimizer, kd_weight * kd + (asl_weight * asl if asl is not None else 0.0), self.clip_norm)
        return {"kd_loss": kd.detach(), "asl": None if asl is None else asl.detach()}

    def close(self):
        self.t_hooks.remove()
        self.s_hooks.remove()


@register_defense
class ASD(Defense):
    """ASD as the paper specifies it by default; the variants of the study "Making ASD keep its accuracy"
    (docs/asd-study.md) are flags: which channels ASL shifts (``--shift``), how hard and how long (``--shift_epochs``,
    ``--shift_kd``, ``--asl_scale``, ``--clip_grad``), batch-norm statistics during the shift (``--freeze_bn``),
    and where ASL looks (``--hook_layers``, e.g. ``layer*.*.bn1``: after batch-norm, SPEC section 11)."""
    name = "asd"
    label = "ASD"
    help = "Attention Shifting Distillation: KD plus ASL on every residual block's conv1 (--ratio_type fix: plain KD)"
    applies_lr_drop = True

    options = (
        Option("--ratio_type", "scheduler", "scheduler: ASD (lambda 0 -> 1 over epochs 0-40, loss x10/x20); fix: "
               "main_loss_ratio*KD + new_loss_ratio*ASL (defaults = plain KD)", type=str, choices=RATIO_TYPES),
        Option("--eps", 0.1, "ASL's eps where the teacher's neuron is exactly 0", range=Range(0, 1, low_open=True)),
        Option("--asl_samples", "all", "all: ASL over every sample of the batch (the paper's expectation); first: "
               "sample 0 of each batch only, as the public code computes it, for comparison with its numbers",
               type=str, choices=("all", "first")),
        Option("--main_loss_ratio", 1.0, "KD weight with --ratio_type fix"),
        Option("--new_loss_ratio", 0.0, "ASL weight with --ratio_type fix"),
        Option("--hook_layers", ",".join(DEFAULT_LAYERS), "comma-separated module names or globs whose outputs ASL "
               "compares (the default matches conv1 of every residual block: 8 layers)", type=str),
        Option("--shift", "all", "all: ASL on every channel of the hooked layers (the paper); dormant: only on the "
               "--shift_fraction of each layer's channels the teacher leaves least active on the clean defense "
               "images (mean ReLU'd batch-norm output: Fine-Pruning's backdoor channels)", type=str,
               choices=("all", "dormant")),
        Option("--shift_fraction", 0.1, "with --shift dormant: the share of each hooked layer's channels shifted (at "
               "least one)", range=UNIT),
        Option("--shift_epochs", 10, "scheduler: epochs of the lambda = 0 phase (the paper: 10); the rest of the "
               "schedule and the x10 -> x20 step move with it", type=int, range=NONNEGATIVE),
        Option("--shift_kd", 0.0, "scheduler: the lowest lambda, a KD weight kept while ASL shifts (the paper: 0, "
               "ASL alone)"),
        Option("--shift_grad", "all", "all: ASL's gradient reaches every layer before a hooked one (the paper); "
               "local: only the hooked convolution's own weights (of the --shift channels): a neuron is shifted, "
               "not the network that feeds it", type=str, choices=("all", "local")),
        Option("--asl_scale", 1.0, "multiplies ASL's weight (a gentler shift below 1)"),
        Option("--clip_grad", 0.0, "clip each step's gradient to this total L2 norm (0: off); ASL's gradient grows as "
               "1/|s| (SPEC section 11)", range=NONNEGATIVE),
        Option("--freeze_bn", "never", "batch-norm layers of the student in eval mode (running statistics frozen and "
               "used): never, during the lambda = 0 epochs (shift), or always", type=str,
               choices=("never", "shift", "always")),
    )
    quiet = ("kd_weight", "asl_weight", "lambda")  # logged every epoch, not printed
    fp32_reason = ("--amp bf16 with an ASL weight that can be non-zero: ASL's gradient is rounding noise in bf16 "
                   "(cosine to fp64 -0.01..0.11, docs/gpu.md); use --amp auto or fp32 (fp32, TF32 off)")

    @classmethod
    def run_name(cls, args):
        """``kd`` for ``--defense asd --ratio_type fix`` (plain KD through ASD's engine), else the defense's name (the
        defenses built on KD keep theirs)."""
        return KD.name if cls is ASD and args.ratio_type == "fix" else cls.name

    @classmethod
    def run_label(cls, args):
        return KD.label if cls is ASD and args.ratio_type == "fix" else cls.label

    @classmethod
    def result_fields(cls, args):
        return {"ratio_type": args.ratio_type}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channels = None      # prepare(): {layer: channels} ASL shifts (--shift dormant), None: all
        self.distiller = None     # stages(): teacher, student, hooks and the step's loss
        self.hooked_layers = None  # stages(): the layers ASL compares

    def run_meta(self):
        return {"hooked_layers": self.hooked_layers}

    def start_line(self):
        return f"hooks on {len(self.hooked_layers)} layers" if self.hooked_layers else ""

    @classmethod
    def needs_fp32(cls, args):
        """ASL's gradient is 2 (1 + t's') t' / |s| (SPEC section 4): most of its squared norm sits in the few
        elements with |s| around 1e-7 to 1e-6 of a layer's scale, far below bf16's rounding of a convolution output
        (about 1e-3 relative) and TF32's; a run whose ASL weight can be non-zero computes in fp32 with TF32 off."""
        return args.ratio_type == "scheduler" or args.new_loss_ratio != 0

    def stages(self, student):
        a, c = self.args, self.config
        optimizer = self.optimizer(student.parameters())
        layers = [s.strip() for s in c.hook_layers.split(",") if s.strip()]
        self.distiller = Distiller(self.teacher, student, optimizer, layers, a.temperature, a.kd_reduction, c.eps,
                                   self.amp, self.compile_losses, c.asl_samples, self.channels, c.clip_grad,
                                   c.shift_grad == "local")
        self.hooked_layers = self.distiller.s_hooks.layers
        bns = [m for m in student.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        weights = {}
        sched = dict(shift_epochs=c.shift_epochs, floor=c.shift_kd) if c.ratio_type == "scheduler" else {}

        def begin(epoch):
            weights["kd"], weights["asl"] = loss_weights(epoch, c.ratio_type, c.main_loss_ratio, c.new_loss_ratio,
                                                         asl_scale=c.asl_scale, **sched)
            weights["freeze"] = c.freeze_bn == "always" or (c.freeze_bn == "shift" and epoch < c.shift_epochs)
            return {"lambda": asd_ratio(epoch, **sched) if c.ratio_type == "scheduler" else None,
                    "kd_weight": weights["kd"], "asl_weight": weights["asl"]}

        def step(x):
            if weights["freeze"]:  # after the engine's model.train(): per step, cheap (one flag per layer)
                for m in bns:
                    m.eval()
            return self.distiller.step(x, weights["kd"], weights["asl"])
        arm = c.shift_epochs if c.ratio_type == "scheduler" else None  # the drop waits for the shift phase's end
        return [self.make_stage("", a.epoch, student, optimizer, step, begin, drop=self.lr_drop_enabled, arm_epoch=arm)]

    def prepare(self, student):
        """``--shift dormant``: choose the channels ASL shifts from the teacher's activity on the defense images."""
        c, self.channels = self.config, None
        if c.shift != "dormant":
            return {}
        hooked = resolve_layers(self.teacher, [s.strip() for s in c.hook_layers.split(",") if s.strip()])
        self.channels = least_active(channel_activity(self.teacher, self.images, hooked), c.shift_fraction)
        return {"shifted_channels": {n: chosen.tolist() for n, chosen in self.channels.items()}}

    def diagnostics(self, model):
        """The base's dead units, plus on the probe images (eval mode): the shares of ASL's four cases over the
        channels ASL compares (``asl_states``), ASL's value there, and the L2 norms of the gradients of the KD
        loss and of ASL, unweighted (SPEC section 11 asks for both; the epoch's weights are logged beside)."""
        d = super().diagnostics(model)
        dist, x = self.distiller, self.probe()
        params = [p for p in model.parameters() if p.requires_grad]
        with eval_mode(model), torch.enable_grad():
            dist.t_hooks.enabled = dist.s_hooks.enabled = True
            with torch.no_grad():
                t_logits = self.logits(self.teacher, x)
            kd = self.kd(self.logits(model, x), t_logits)
            t_feats, s_feats = dist.asl_features()
            asl = dist.hooked_asl((t_feats, s_feats))
            states = [asl_states(t_feats[n], s_feats[n]) for n in dist.s_hooks.layers]
            d["asl_states"] = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
            d["asl_probe"] = asl.item()
            for name, term in (("grad_kd", kd), ("grad_asl", asl)):
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True) \
                    if params and term.requires_grad else []
                d[name] = torch.stack([g.norm() ** 2 for g in grads if g is not None]).sum().sqrt().item() \
                    if any(g is not None for g in grads) else 0.0
        return d

    def close(self):
        if self.distiller is not None:
            self.distiller.close()


@register_defense
class KD(ASD):
    name = "kd"
    label = "KD"
    help = "plain knowledge distillation: ASD's engine with --ratio_type fix (1 x KD + 0 x ASL)"
    # none of ASD's flags: they shape ASL, which KD weighs 0; their values are fixed at ASD's defaults
    options = ()
    defaults = {**{o.dest: o.default for o in ASD.options}, "ratio_type": "fix"}

    @classmethod
    def config_fields(cls):  # ASD's engine reads them: the values of the defaults above (and the subclasses' own)
        return cls.options + ASD.options
