"""Adversarial unlearning with one universal perturbation, through every epoch of KD (I-BAU, ICLR 2022; ABD's
self-retrospection, ICML 2023, is the same idea rewritten for KD).

One perturbation ``delta`` (3 x 32 x 32) lives for the whole run. Each step it climbs ``--adv_steps`` times
(L2-normalised steps of ``--adv_lr``, projected to the L2 ball of ``--adv_radius``; images stay valid,
``clip(x + delta, 0, 1)``) on the divergence of the model ``--adv_search`` names:

- ``student`` (I-BAU): ``D(s(x + delta), t(x))``, the student's answer on the perturbed image against the
  teacher's on the clean one. The last ascent step rides on the student's own backward: the perturbed batch's
  gradient gives the student's update and delta's at once, so ``--adv_steps 1`` costs one forward of the
  clean and perturbed batch together and one backward;
- ``teacher`` (ABD's self-retrospection): ``KL(t(x + delta) || t(x))`` on the frozen teacher, one forward
  and backward of the teacher per ascent step. The teacher does not change, so neither does what delta
  finds: the trigger's direction, not the student's ordinary adversarial one.

The student minimises ``KD(s(x), t(x)) + beta D(s(x + delta), t(x))``, ``D = KL(softmax t(x) || softmax
s(x + delta))`` at temperature 1 (``helper.train.perturb.soft_kl``); KD is the package's (``--temperature``,
``--kd_reduction``). I-BAU's implicit hypergradient (K = 5 fixed-point steps per outer step) is replaced by
this alternation: a hypergradient costs K more backward passes per step, and ABD's port showed that the
alternation is what KD affords every step; measured in bench.py (docs/defenses.md).

Defaults: SGD 0.01, momentum 0.9, weight decay 5e-4, cosine, batch 128 (the fine-tuning recipe that kept
the student's accuracy in docs/experiments.md); I-BAU's own outer optimiser (Adam 1e-3) drove
ABD's student off on the same setup. ``--adv_radius`` 3 (an ADBA trigger at the paper's 24.5 dB changes an
image by about L2 3.3; SPEC section 13), ``--adv_lr`` 0.5, ``--adv_beta`` 1.
"""
import torch
import torch.nn.functional as F

from helper.defenses.base import FINE_TUNING, Defense, check_adversary
from helper.train.engine import optimizer_step
from helper.train.evaluate import eval_mode
from helper.train.perturb import ascent_step, effect, input_grad, l2_norms, project, random_direction, soft_kl, stamp


def universal_unlearning_loss(kd, s_pert, t_clean, beta):
    """``(kd + beta * D, D)``, ``D = KL(softmax t(x) || softmax s(x + delta))``: the student's loss, KD on the clean
    batch plus the unlearning term, and the term alone (logged)."""
    unlearn = soft_kl(t_clean, s_pert)
    return kd + beta * unlearn, unlearn


def self_retrospection_loss(t_pert, t_clean):
    """What delta climbs on the teacher: ``KL(t(x + delta) || t(x))`` (ABD's ``unlearn.py``), summed over
    classes, batch mean; the gradient flows through the perturbed answer (the first argument)."""
    log_p, log_q = F.log_softmax(t_pert.float(), 1), F.log_softmax(t_clean.detach().float(), 1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


class IBAU(Defense):
    name = "ibau"
    help = ("adversarial unlearning during KD: one universal perturbation climbs the student's (I-BAU) or the "
            "teacher's (ABD's self-retrospection) divergence; the student keeps the teacher's clean answer there")
    defaults = FINE_TUNING

    @classmethod
    def add_args(cls, g):
        g.add_argument("--adv_search", default="student", choices=["student", "teacher"],
                       help="whose divergence delta climbs: student: D(s(x + delta), t(x)) (I-BAU); teacher: "
                            "KL(t(x + delta) || t(x)) on the frozen teacher (ABD's self-retrospection)")
        g.add_argument("--adv_steps", type=int, default=1,
                       help="ascent steps of delta per training step (with --adv_search student the last one "
                            "uses the student's own backward, at no extra cost)")
        g.add_argument("--adv_lr", type=float, default=0.5, help="L2 length of one ascent step of delta")
        g.add_argument("--adv_radius", type=float, default=3.0,
                       help="L2 radius of delta over a 3x32x32 image in [0, 1] pixels")
        g.add_argument("--adv_beta", type=float, default=1.0, help="weight of the unlearning term D")

    def stages(self, student):
        a = self.args
        check_adversary(a)
        generator = torch.Generator().manual_seed(a.seed + 7)
        self.delta = random_direction((1, 3, 32, 32), a.adv_radius, generator, self.device)
        optimizer = self.optimizer(student.parameters())
        fused = a.adv_search == "student"

        def climb(x, t_clean, times):
            for _ in range(times):
                if fused:
                    with eval_mode(student):
                        _, g = input_grad(lambda xp: soft_kl(t_clean, self.logits(student, xp)), x, self.delta)
                else:
                    _, g = input_grad(lambda xp: self_retrospection_loss(self.logits(self.teacher, xp, input_grad=True), t_clean),
                                      x, self.delta)
                self.delta = project(ascent_step(self.delta, g, a.adv_lr), a.adv_radius)

        def step(x):
            t = self.logits(self.teacher, x)
            climb(x, t, a.adv_steps - 1 if fused else a.adv_steps)
            d = self.delta.detach().requires_grad_(fused)
            s_both = self.logits(student, torch.cat([x, stamp(x, d)]))
            s, s_pert = s_both[:len(x)], s_both[len(x):]
            kd = self.kd(s, t)
            loss, unlearn = universal_unlearning_loss(kd, s_pert, t, a.adv_beta)
            optimizer_step(optimizer, loss)
            if fused:  # the student's backward gave delta's gradient too: its last ascent step
                self.delta = project(ascent_step(self.delta, d.grad, a.adv_lr), a.adv_radius)
            return {"kd_loss": kd.detach(), "unlearn": unlearn.detach()}
        return [self.make_stage("", a.epoch, student, optimizer, step)]

    def state(self):
        return {"delta": self.delta.detach().cpu()}

    def restore(self, state):
        if "delta" in state:
            self.delta = state["delta"].to(self.device)

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
