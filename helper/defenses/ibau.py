"""Adversarial unlearning with one universal perturbation, through every epoch of KD (I-BAU, ICLR 2022; ABD's
self-retrospection, ICML 2023, is the same idea rewritten for KD).

One perturbation ``delta`` (3 x 32 x 32) lives for the whole run, starting at a random point of L2 norm
``--adv_init`` x ``--ibau_radius`` (0.01 x 3: near 0, as I-BAU's and ABD's code start, but off it, where a divergence
between two equal answers has no gradient). Each step it climbs ``--adv_steps`` times (L2-normalised steps of
``--ibau_lr``, projected to the L2 ball of ``--ibau_radius``; images stay valid, ``clip(x + delta, 0, 1)``) on what
``--adv_search`` and ``--adv_target`` name:

- ``student`` (I-BAU): ``D(s(x + delta), t(x))``, the student's answer on the perturbed image against the
  teacher's on the clean one. The last ascent step rides on the student's own backward: the unlearning term's
  gradient gives the student's update and delta's at once, so ``--adv_steps 1`` costs no extra backward;
- ``teacher`` (ABD's self-retrospection, its ``unlearn.py``): ``T^2 KL(softmax(t(x) / T) || softmax(t(x + delta) /
  T))`` on the frozen teacher at ``--adv_temperature`` T = 8 (its ``KLDiv(T)`` of the perturbed and clean logits; ABD
  re-learns delta from 0 with 10-20 Adam steps every step, here it persists), one teacher forward and backward per
  ascent step. The teacher does not change, so neither does what delta finds;
- ``--adv_target c``: the searched model's log-probability of class ``c`` (a suspected target, from ``scan.py``)
  instead of a divergence (``target_log_prob``): the budget goes to the shortcut into ``c`` rather than to the
  model's ordinary adversarial directions; every ascent step is then apart from the student's backward.

The student minimises ``KD(s(x), t(x)) + beta D(s(x + delta), t(x))``, ``D = KL(softmax t(x) || softmax
s(x + delta))`` at temperature 1 (``helper.train.perturb.soft_kl``); KD is the package's (``--temperature``,
``--kd_reduction``). The perturbed images go through the student in a forward of their own, after the clean batch's
(``--adv_bn``): ``batch`` (the default) normalises them by their own batch statistics and leaves the running
statistics, which evaluation uses, to the clean images; ``eval`` uses the running statistics (I-BAU's and SAU's
code); ``shared`` is this package before issue 29 (clean and perturbed images in one train-mode batch, the running
statistics averaged over both). Every ascent step sees the student as the unlearning term does. Measured on two
ADBA teachers (docs/experiments.md, "ibau's batch norm"): ``eval`` collapses the student (Acc 0.19-0.34 of KD's
0.55 at width 8, a NaN loss in the first epoch at width 16), ``batch`` keeps 89-91% of KD's accuracy. I-BAU's implicit hypergradient (K = 5 fixed-point steps per outer step) is
replaced by this alternation: a hypergradient costs K more backward passes per step, and ABD's port showed that
the alternation is what KD affords every step; measured in bench.py (docs/defenses.md).

``--adv_mask_every N`` (with ``--adv_target c``) adds the other family of the scan: Neural Cleanse's smallest
mask-and-pattern trigger of ``c`` (``x (1 - m) + p m``), inverted on the teacher before training and on the student
every ``N`` epochs (warm-started), stamped on ``--adv_mask_share`` of every clean batch, whose KD target stays the
teacher's answer on the clean image (``--defense nc``'s unlearning, beside the universal delta).

``--freeze_bn always`` runs every forward of the student in eval mode (its running statistics, frozen): the student
is trained as it is evaluated. Where the defense images' batch statistics are far from the teacher's running ones
(the demo's synthetic images: ``helper.jobs.auto.bn_mismatch``), train mode made the student answer one class after
an epoch whatever the radius, even with the student's own clean answer as the unlearning term's label; in eval mode
it keeps KD's accuracy, with ``--clip_grad 1`` (without, the loss is not finite in the first epoch: the inverted
triggers move the eval-mode student's answers far at once). Measured in docs/experiments.md.

Defaults: SGD 0.01, momentum 0.9, weight decay 5e-4, cosine, batch 128 (the fine-tuning recipe that kept
the student's accuracy in docs/experiments.md); I-BAU's own outer optimiser (Adam 1e-3) drove
ABD's student off on the same setup. ``--ibau_radius`` 3 (an ADBA trigger at the paper's 24.5 dB changes an
image by about L2 3.3; SPEC section 13), ``--ibau_lr`` 0.5, ``--adv_beta`` 1; ``--adv_radius`` and ``--adv_lr``
still parse as the first two (``sau`` has radius and step flags of its own, in L-infinity).
"""
import contextlib

import torch
import torch.nn.functional as F

from helper.data.images import to_float
from helper.defenses.base import FINE_TUNING, Defense, register_defense
from helper.defenses.nc import SCAN_BATCH, SCAN_IMAGES, stamp_share
from helper.run.cli import AT_LEAST_ONE, NONNEGATIVE, POSITIVE, UNIT, Option
from helper.run.errors import UserError
from helper.train.engine import optimizer_step
from helper.train.evaluate import eval_mode
from helper.train.perturb import (MaskPattern, ascent_step, effect, input_grad, l2_norms, load_inverted, minimal_trigger,
                                  project, random_direction,
                                  class_kl, soft_kl, stamp)


def universal_unlearning_loss(kd, s_pert, t_clean, beta, target=None):
    """``(kd + beta * D, D)``, ``D = KL(softmax t(x) || softmax s(x + delta))``: the student's loss, KD on the clean
    batch plus the unlearning term, and the term alone (logged). With ``target`` c, ``D`` is the binary KL of class
    c's probability alone (``class_kl``)."""
    unlearn = soft_kl(t_clean, s_pert) if target is None else class_kl(t_clean, s_pert, target)
    return kd + beta * unlearn, unlearn


def self_retrospection_loss(t_pert, t_clean, temperature=8.0):
    """What delta climbs on the teacher, ABD's ``unlearn.py`` (its ``KLDiv(T)`` of ``(t(x + delta), t(x))``):

        T^2 * KL(softmax(t(x) / T) || softmax(t(x + delta) / T)),

    summed over classes, batch mean; the gradient flows through the perturbed answer (the first argument)."""
    return temperature ** 2 * soft_kl(t_clean.float() / temperature, t_pert.float() / temperature)


def target_log_prob(logits, target):
    """What a targeted search climbs: ``mean_n log softmax(logits_n)_c``, the log-probability of class ``c`` (the
    suspected target) on the perturbed images, batch mean, fp32."""
    return F.log_softmax(logits.float(), 1)[:, target].mean()


@contextlib.contextmanager
def frozen_bn_stats(model):
    """The model in train mode (batch-norm normalises by the batch's own statistics) with every batch-norm's
    running statistics left as they are (momentum 0: ``running = (1 - 0) running + 0 batch``); the modes and
    momenta are restored after the block, also on an error."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved, mode = [m.momentum for m in bns], model.training
    try:
        model.train()
        for m in bns:
            m.momentum = 0.0
        yield
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
        model.train(mode)


PERTURBED_BN = {"eval": eval_mode, "batch": frozen_bn_stats}


@register_defense
class IBAU(Defense):
    name = "ibau"
    label = "I-BAU"
    help = ("adversarial unlearning during KD: one universal perturbation climbs the student's (I-BAU) or the "
            "teacher's (ABD's self-retrospection) divergence; the student keeps the teacher's clean answer there")
    defaults = FINE_TUNING
    options = (
        Option("--adv_search", "student", "whose divergence delta climbs: student: D(s(x + delta), t(x)) (I-BAU); "
               "teacher: T^2 KL(t(x) / T || t(x + delta) / T) on the frozen teacher (ABD's self-retrospection)",
               type=str, choices=("student", "teacher")),
        Option("--adv_steps", 1, "ascent steps of delta per training step (with --adv_search student the last one "
               "uses the student's own backward, at no extra cost)", type=int, range=AT_LEAST_ONE),
        Option("--ibau_lr", 0.5, "L2 length of one ascent step of delta", range=POSITIVE, aliases=("--adv_lr",)),
        Option("--ibau_radius", 3.0, "L2 radius of delta over a 3x32x32 image in [0, 1] pixels", range=POSITIVE,
               aliases=("--adv_radius",)),
        Option("--adv_beta", 1.0, "weight of the unlearning term D", range=NONNEGATIVE),
        Option("--adv_init", 0.01, "delta's start: a random point on the L2 sphere of this fraction of --ibau_radius "
               "(1: the sphere itself, this package before issue 29). I-BAU's and ABD's code start at 0, where a "
               "divergence between two equal answers has no gradient: a small start gives it one", range=UNIT),
        Option("--adv_bn", "batch", "the student's batch-norm on the perturbed images, for its unlearning term and "
               "every ascent step alike: batch: the perturbed batch's own statistics, the running ones left to the "
               "clean images; eval: running statistics (I-BAU's and SAU's code); shared: clean and perturbed images "
               "in one train-mode batch, the running statistics learning from both (this package before issue 29; "
               "kept to reproduce its numbers)", type=str, choices=("batch", "eval", "shared")),
        Option("--adv_temperature", 8.0, "--adv_search teacher: the temperature T of the divergence delta climbs "
               "(ABD: 8)", range=POSITIVE),
        Option("--adv_every", 1, "delta climbs on every this-many-th training step only (and rests in between): with "
               "the frozen teacher searched, what it climbs does not change, so a rest costs little and saves the "
               "teacher's backward", type=int, range=AT_LEAST_ONE),
        Option("--adv_start", None, "a scan.py folder: delta starts at its inverted universal trigger of "
               "--adv_target's class (projected to the ball) instead of --adv_init's random point", type=str,
               metavar="SCAN_DIR"),
        Option("--adv_target", None, "a suspected target class c (scan.py names one): delta climbs the searched "
               "model's log-probability of c on x + delta instead of a divergence, every ascent step apart from the "
               "student's backward; the student's term still keeps the teacher's clean answer", type=int,
               range=NONNEGATIVE),
        Option("--adv_mask_every", 0, "with --adv_target c: also unlearn Neural Cleanse's mask-and-pattern trigger of "
               "c (x (1 - m) + p m), inverted on the teacher before training (on the first 100 defense images) and "
               "again on the student every this many epochs, stamped on --adv_mask_share of every clean batch whose KD "
               "target stays the teacher's answer on the clean image (0: off)", type=int, range=NONNEGATIVE),
        Option("--adv_mask_share", 0.2, "with --adv_mask_every: the share of every batch that carries the inverted "
               "mask trigger", range=UNIT),
        Option("--freeze_bn", "never", "the student's batch norm through the whole step: never (train mode: each "
               "batch's own statistics, the clean batch's updating the running ones) or always (eval mode: the running "
               "statistics, frozen; the student is trained as it is evaluated, the perturbed pass too, --adv_bn "
               "aside). --defense auto picks always where the teacher's answers under the defense images' batch "
               "statistics are far from its answers under its running ones", type=str, choices=("never", "always")),
        Option("--adv_term", "full", "the student's unlearning term D on x + delta: full: KL(softmax t(x) || "
               "softmax s(x + delta)) over every class; target (with --adv_target c): the binary KL of class c's "
               "probability alone, the student free to answer any other class there", type=str,
               choices=("full", "target")),
        Option("--clip_grad", 0.0, "clip each step's gradient to this total L2 norm (0: off)", range=NONNEGATIVE),
    )

    @classmethod
    def check(cls, args):
        super().check(args)
        if args.adv_start is not None and args.adv_target is None:
            raise UserError("--adv_start needs --adv_target: the class whose inverted trigger delta starts from")
        if args.adv_mask_every and args.adv_target is None:
            raise UserError("--adv_mask_every needs --adv_target: the class whose mask trigger is inverted")
        if args.adv_term == "target" and args.adv_target is None:
            raise UserError("--adv_term target needs --adv_target: the class whose probability the term keeps")
        if args.freeze_bn == "always" and args.adv_bn == "shared":
            raise UserError("--freeze_bn always keeps the running statistics frozen; --adv_bn shared updates them "
                            "from the perturbed images: choose one")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delta, self.steps = None, 0  # stages(): the universal perturbation and the steps taken
        # --adv_mask_every: the mask-and-pattern family, its images and the current trigger's parameters
        self.family, self.mask_images, self.mask_params = MaskPattern(), None, None

    def invert_mask(self, model, params=None):
        """The parameters of the smallest mask-and-pattern trigger sending 90% of the mask images to --adv_target on
        ``model`` (eval mode), warm-started from ``params``."""
        with eval_mode(model):
            return minimal_trigger(lambda z: self.logits(model, z, input_grad=model is self.teacher), self.mask_images,
                                   self.config.adv_target, self.family, batch_size=SCAN_BATCH, success=0.9,
                                   generator=torch.Generator().manual_seed(self.args.seed + 11), params=params).params

    def stages(self, student):
        a, c = self.args, self.config
        if c.adv_target is not None and c.adv_target >= self.teacher.num_classes:
            raise UserError(f"--adv_target {c.adv_target} is not a class of the {self.teacher.num_classes}-class teacher")
        if c.adv_start is not None:
            start = load_inverted(c.adv_start, "universal", c.adv_target)[0].reshape(1, 3, 32, 32)
            self.delta = project(start.to(self.device), c.ibau_radius)
        else:
            self.delta = random_direction((1, 3, 32, 32), c.adv_init * c.ibau_radius,
                                          torch.Generator().manual_seed(a.seed + 7), self.device)
        self.steps = 0  # training steps taken: delta climbs on every --adv_every-th
        if c.adv_mask_every:
            self.mask_images = to_float(self.images[:SCAN_IMAGES])
            self.mask_params = self.invert_mask(self.teacher)
        optimizer = self.optimizer(student.parameters())

        def begin(epoch):
            if c.adv_mask_every and epoch and epoch % c.adv_mask_every == 0:
                self.mask_params = self.invert_mask(student, self.mask_params)
            return {}

        def clean(x):  # the clean batch the student's KD term sees: a share stamped with the mask trigger
            return stamp_share(x, c.adv_mask_share, self.family, self.mask_params) if c.adv_mask_every else x
        fused = c.adv_search == "student" and c.adv_target is None
        frozen = c.freeze_bn == "always"  # every forward of the student in eval mode, the perturbed pass's too
        perturbed_mode = PERTURBED_BN["eval" if c.adv_bn == "shared" or frozen else c.adv_bn]

        def climb(x, t_clean, times):
            for _ in range(times):
                if c.adv_target is not None:  # the student as the unlearning term sees it; the teacher as it is
                    model, mode = ((student, perturbed_mode(student)) if c.adv_search == "student"
                                   else (self.teacher, contextlib.nullcontext()))
                    with mode:
                        _, g = input_grad(lambda xp: target_log_prob(
                            self.logits(model, xp, input_grad=True), c.adv_target), x, self.delta)
                elif fused:
                    with perturbed_mode(student):
                        _, g = input_grad(lambda xp: soft_kl(t_clean, self.logits(student, xp)), x, self.delta)
                else:
                    _, g = input_grad(lambda xp: self_retrospection_loss(
                        self.logits(self.teacher, xp, input_grad=True), t_clean, c.adv_temperature), x, self.delta)
                self.delta = project(ascent_step(self.delta, g, c.ibau_lr), c.ibau_radius)

        def step(x):
            with eval_mode(student) if frozen else contextlib.nullcontext():
                return unlearning_step(x)

        def unlearning_step(x):
            t = self.logits(self.teacher, x)
            climbs = self.steps % c.adv_every == 0
            self.steps += 1
            ride = fused and climbs  # the student's backward gives delta's last ascent step
            times = (c.adv_steps - 1 if fused else c.adv_steps) if climbs else 0
            if c.adv_bn == "shared":  # one train-mode batch of clean and perturbed images (before issue 29)
                climb(x, t, times)
                d = self.delta.detach().requires_grad_(ride)
                both = self.logits(student, torch.cat([clean(x), stamp(x, d)]))
                s, s_pert = both[:len(x)], both[len(x):]
            else:
                # the clean batch first: its train-mode forward updates the running statistics, so every ascent step
                # after it and the perturbed pass (whose backward reads those statistics) see one and the same student
                s = self.logits(student, clean(x))
                climb(x, t, times)
                d = self.delta.detach().requires_grad_(ride)
                with perturbed_mode(student):
                    s_pert = self.logits(student, stamp(x, d))
            kd = self.kd(s, t)
            loss, unlearn = universal_unlearning_loss(
                kd, s_pert, t, c.adv_beta, c.adv_target if c.adv_term == "target" else None)
            optimizer_step(optimizer, loss, c.clip_grad)
            if ride:  # the student's backward gave delta's gradient too: its last ascent step
                self.delta = project(ascent_step(self.delta, d.grad, c.ibau_lr), c.ibau_radius)
            return {"kd_loss": kd.detach(), "unlearn": unlearn.detach()}
        return [self.make_stage("", a.epoch, student, optimizer, step, begin)]

    def state(self):
        return {"delta": self.delta.detach().cpu(), "steps": self.steps,
                **({"mask": [p.detach().cpu() for p in self.mask_params]} if self.mask_params is not None else {})}

    def restore(self, state):
        if "delta" in state:
            self.delta = state["delta"].to(self.device)
        self.steps = int(state.get("steps", 0))
        if "mask" in state:
            self.mask_params = [p.to(self.device) for p in state["mask"]]

    def diagnostics(self, model):
        """The base's dead units, and what delta does on the probe images to the teacher and the student
        (``adv``: share of answers changed, the class most perturbed images go to and its share; ``delta_l2``)."""
        d = super().diagnostics(model)
        if self.images is None:
            return d
        x = self.probe()
        with eval_mode(model):
            xp = stamp(x, self.delta)
            d["adv"] = {"teacher": effect(self.teacher, x, xp), "student": effect(model, x, xp),
                        "delta_l2": float(l2_norms(self.delta)[0])}
        return d
