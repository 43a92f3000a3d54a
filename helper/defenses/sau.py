"""Shared Adversarial Unlearning (NeurIPS 2023) during KD: the frozen teacher is SAU's reference model, the
student the model being purified.

Each step, per-sample PGD (``helper.train.perturb.shared_pgd``: L-inf ball ``--adv_radius`` 0.2, ``--adv_steps`` 5
signed steps of ``--adv_lr`` 0.2 from ``+radius``, ``--sau_beta1`` 0.01 on the adversarial CE and
``--sau_beta2`` 1 on the JS term) searches *shared* adversarial examples: perturbations that send the student
and the teacher to the same wrong class. The label of SAU's terms is the teacher's answer on the clean image.
The student then minimises

    KD(s(x), t(x)) + lambda * SAU's shared loss (-log(1 - p_s(y_t' | x + delta)) over the images whose
    perturbation fools the teacher, y_t' being the teacher's class there; ``sau_shared_loss``)

with KD in place of SAU's clean cross-entropy (``--sau_lambda`` 1; SAU's plain adversarial-training term,
lambda_2, is 0 in its config and left out). The student's batch-norm layers stay in eval mode during the
whole step, as SAU's code runs by default (its ``--train_mode`` off: "fixing BN leads to higher ACC"); the
clean and perturbed batches go through the student together. Images stay valid (``clip(x + delta, 0, 1)``;
SAU's code leaves that clip commented out). Defaults from its ``config/defense/sau/config.yaml``: Adam 1e-4,
cosine, batch 256, weight decay 0.
"""
import torch

from helper.defenses.base import Defense, register_defense
from helper.run.cli import AT_LEAST_ONE, NONNEGATIVE, Option, Range
from helper.train.engine import optimizer_step
from helper.train.evaluate import eval_mode
from helper.train.perturb import effect, sau_shared_loss, shared_masks, shared_pgd, stamp


@register_defense
class SAU(Defense):
    name = "sau"
    label = "SAU"
    help = ("Shared Adversarial Unlearning during KD: PGD finds perturbations that fool student and teacher to the "
            "same class; the student unlearns the teacher's class there")
    defaults = {"opt_type": "Adam", "opt_lr": 1e-4, "lr_schedule": "cosine", "batch_size": 256, "lr_drop": "off"}

    options = (
        Option("--sau_radius", 0.2, "L-infinity radius of the per-sample perturbation, on images in [0, 1]",
               range=Range(0, 1, low_open=True), aliases=("--adv_radius",)),
        Option("--adv_steps", 5, "PGD steps per training step", type=int, range=AT_LEAST_ONE),
        Option("--sau_lr", 0.2, "PGD's signed step size (L-infinity)", range=Range(0, 1, low_open=True),
               aliases=("--adv_lr",)),
        Option("--sau_beta1", 0.01, "PGD: weight of the adversarial cross-entropy", range=NONNEGATIVE),
        Option("--sau_beta2", 1.0, "PGD: weight of the JS term (same wrong class)", range=NONNEGATIVE),
        Option("--sau_lambda", 1.0, "weight of the shared unlearning loss", range=NONNEGATIVE),
    )

    def stages(self, student):
        a, c = self.args, self.config
        optimizer = self.optimizer(student.parameters())

        def search(model, x, labels):  # labels: the teacher's answers on x, SAU's label and its clean reference
            return shared_pgd(lambda z: self.logits(model, z), lambda z: self.logits(self.teacher, z, input_grad=True),
                              x, labels, c.sau_radius, c.sau_lr, c.adv_steps, c.sau_beta1, c.sau_beta2, labels)
        self.search = search

        def step(x):
            with eval_mode(student):
                t = self.logits(self.teacher, x)
                labels = t.argmax(1)
                xp = stamp(x, search(student, x, labels))
                t_pert = self.logits(self.teacher, xp)
                s_both = self.logits(student, torch.cat([x, xp]))
                s, s_pert = s_both[:len(x)], s_both[len(x):]
                masks = shared_masks(s_pert.detach(), t_pert, s.detach(), labels)
                kd = self.kd(s, t)
                shared = sau_shared_loss(s_pert, t_pert.argmax(1), masks.fooled_ref)
                optimizer_step(optimizer, kd + c.sau_lambda * shared)
            return {"kd_loss": kd.detach(), "shared_loss": shared.detach(),
                    "teacher_fooled": masks.fooled_ref.float().mean(), "shared": masks.shared.float().mean()}
        return [self.make_stage("", a.epoch, student, optimizer, step)]

    def diagnostics(self, model):
        """The base's dead units, and on the probe images with a fresh search against ``model``: the share of
        examples that fool the teacher, the student, both to one class (``shared``), and each model's ``effect``."""
        d = super().diagnostics(model)
        if self.images is None:
            return d
        x = self.probe()
        with eval_mode(model):
            t_clean = self.logits(self.teacher, x)
            xp = stamp(x, self.search(model, x, t_clean.argmax(1)))
            with torch.no_grad():
                masks = shared_masks(self.logits(model, xp), self.logits(self.teacher, xp), self.logits(model, x),
                                     t_clean)
            d["adv"] = {"teacher": effect(self.teacher, x, xp), "student": effect(model, x, xp),
                        "shared": masks.shared.float().mean().item(), "common": masks.common.float().mean().item()}
        return d
