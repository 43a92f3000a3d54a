"""ABD's shuffling vaccine (ICML 2023) for out-of-distribution KD, as its ``BackdoorSuspectLoss`` does it.

Three copies of the teacher, each with the input channels of its last 5 convolutions (of those named
``conv*``: layer3.1.conv2 and the four of layer4, as its code counts them) permuted once; their mean logits
are the ensemble's. A sample is suspicious when the ensemble's predicted class equals the teacher's.
Loss = mean KD over the other samples - 0.1 x mean KD over the suspicious ones, where a sample's KD is
``KL(softmax(t/T) || softmax(s/T))`` averaged over the classes, without T^2 (its ``KDLoss`` with
``reduction='none'``, then means over kept and flagged entries). The defaults of its ``vanilla_kd_ood.py`` and
OOD sweep: a freshly initialised student (``--initialize_student`` False: ``--using_checkpoint 0`` here), T = 8,
Adam lr 1e-3 without weight decay, batch 512, CutMix on every batch (beta 0.25, probability 1.0; the teacher
labels the mixed image), and a step schedule (x0.5 at epochs 150, 300, 600). Its ``pseudo_test_batches`` is 0
in that sweep, so the vaccine is on from the first batch, as here.
"""
import copy

import numpy as np
import torch

from helper.data.images import cutmix
from helper.defenses.base import Defense, register_defense
from helper.run.cli import AT_LEAST_ONE, NONNEGATIVE, UNIT, Option
from helper.train.losses import kd_per_sample


@torch.no_grad()
def shuffled_copy(model, n_layers, generator):
    """A copy of ``model`` whose last ``n_layers`` convolutions named ``conv*`` have their input channels permuted."""
    shuffled = copy.deepcopy(model)
    convs = [m for name, m in shuffled.named_modules()
             if isinstance(m, torch.nn.Conv2d) and name.split(".")[-1].startswith("conv")]
    for conv in convs[len(convs) - n_layers:] if n_layers else []:
        perm = torch.randperm(conv.weight.shape[1], generator=generator).to(conv.weight.device)
        conv.weight.copy_(conv.weight[:, perm])
    return shuffled


def suspicious(ensemble_logits, teacher_logits):
    """ABD's flag: the shuffled ensemble predicts the same class as the teacher (a bool per sample)."""
    return ensemble_logits.argmax(1) == teacher_logits.argmax(1)


def vaccine_loss(per_sample_kd, flagged, coef=0.1):
    """``mean KD over unflagged - coef * mean KD over flagged`` (an empty group contributes 0).

    A batch whose samples are all flagged gives ``-coef * mean KD`` here: the student is pushed away from the
    teacher on that batch and learns nothing else from it. Its code divides by the count of kept samples, 0 there,
    and gets NaN, which its Adam step would write into every weight; we keep the finite value so that one such
    batch cannot end a run, at the price of one step that only pushes away. (Its first term's 0/0 is taken as 0 by the ``clamp_min(1)`` of the count.)"""
    keep = (~flagged).float()
    flag = flagged.float()
    return ((per_sample_kd * keep).sum() / keep.sum().clamp_min(1)
            - coef * (per_sample_kd * flag).sum() / flag.sum().clamp_min(1))


@register_defense
class ABD(Defense):
    name = "abd"
    label = "ABD"
    help = "ABD's shuffling vaccine: KD that pushes away from samples a channel-shuffled teacher still agrees on"
    defaults = {"opt_type": "Adam", "opt_lr": 1e-3, "batch_size": 512, "temperature": 8.0, "lr_drop": "off",
                "using_checkpoint": 0, "lr_schedule": "step", "lr_milestones": [150, 300, 600], "lr_gamma": 0.5}

    options = (
        Option("--abd_copies", 3, "shuffled teacher copies in the ensemble", type=int, range=AT_LEAST_ONE),
        Option("--abd_layers", 5, "last convolutions whose input channels are shuffled", type=int, range=AT_LEAST_ONE),
        Option("--abd_coef", 0.1, "weight of the suspicious samples' (negative) KD", range=NONNEGATIVE),
        Option("--abd_cutmix_beta", 0.25, "CutMix box area ~ 1 - Beta(b, b) on every batch (ABD's code); 0: no "
               "CutMix", range=NONNEGATIVE),
        Option("--abd_cutmix_prob", 1.0, "probability that a batch is cut-mixed", range=UNIT),
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = np.random.default_rng(self.args.seed)  # CutMix's draws, kept in last.pt

    def state(self):
        return {"cutmix_rng": self.rng.bit_generator.state}

    def restore(self, state):
        if "cutmix_rng" in state:
            self.rng.bit_generator.state = state["cutmix_rng"]

    def stages(self, student):
        a, c = self.args, self.config
        generator = torch.Generator().manual_seed(a.seed)
        copies = [shuffled_copy(self.teacher, c.abd_layers, generator).eval() for _ in range(c.abd_copies)]
        optimizer = self.optimizer(student.parameters())

        def loss(s, t, x):
            with torch.no_grad():
                ensemble = torch.stack([self.logits(m, x).float() for m in copies]).mean(0)
            flagged = suspicious(ensemble, t)
            per_sample = kd_per_sample(s, t, a.temperature) / (a.temperature ** 2 * s.shape[1])  # class mean, no T^2
            return (vaccine_loss(per_sample, flagged, c.abd_coef), {"flagged_share": flagged.float().mean()})
        distill = self.distill_step(student, self.teacher, loss, optimizer)

        def step(x):
            return distill(cutmix(x, self.rng, c.abd_cutmix_beta, c.abd_cutmix_prob))
        return [self.make_stage("", a.epoch, student, optimizer, step)]
