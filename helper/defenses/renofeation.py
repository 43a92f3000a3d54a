"""Renofeation, re-training with noisy feature distillation (Chin et al., "Improving the Adversarial Robustness of
Transfer Learning via Noisy Feature Distillation", 2020; CVPR-W 2021), adapted to a backdoored teacher and
unlabelled defense images.

The student starts from fresh weights (``--using_checkpoint 0``; PyTorch's default initialisation, which is
what its code's ``--reinit`` restores) and minimises

    L = KD(s, t) + lambda * sum_l mean((F_s,l - F_t,l)^2) + beta / 2 * (||W||^2 + ||b||^2)

- ``KD``: the package's KD on the logits (``--temperature``, ``--kd_reduction``; what selection reads as
  ``kd_loss``). Its code has cross-entropy on labels here; a defender has no labels, so the defaults are T 1 and
  the per-sample mean (``batchmean``): cross-entropy against the teacher's probabilities less the teacher's
  entropy, on the scale of its code's cross-entropy, so the feature weight 5 keeps its code's balance (at the
  package's T 40 with the class mean, KD is about 0.02 against a weighted feature term near 30 at the start).
- the feature term (``feature_distillation_loss``): the mean squared difference of the outputs of the residual
  groups ``layer1`` .. ``layer4`` (``--reno_layers``), summed over groups, times lambda = 5 (``--reno_feat_weight``;
  its script: 5 on four of its five datasets, 1 on CUB-200). The teacher is frozen in eval mode.
- noise: spatial dropout (``torch.nn.Dropout2d``, ``--reno_dropout`` 0.1) on the output of each compared group,
  in the student's forward while it trains, where its ``fe_resnet.py`` puts it: a group's output is compared
  *before* its own dropout, and the next group (the head after layer4) reads the dropped version, so the
  comparison at layer2-4 and the logits are of a noisy forward. Nothing is dropped in eval mode.
- ``head_l2_penalty``: beta / 2 times the squared norm of the linear head, beta = 0.01 (``--reno_head_l2``,
  its ``--beta``).

Stochastic weight averaging over the last part of the run (``torch.optim.swa_utils``): from epoch
``floor(0.75 * epochs)`` (``--reno_swa_start``) the lr is ``SWALR``'s constant 5e-3 (``--reno_swa_lr``, no
annealing: ``--reno_swa_anneal`` 0) and the weights are averaged (``AveragedModel``, equal weights) once at the
end of every epoch. Its script trains 90,000 iterations with cosine annealing, then 30,000 more from there with
SWA at a constant lr 5e-3 (an average every 500 iterations): the last quarter of 120,000. Here the cosine of
``--lr_schedule`` runs over the epochs before SWA; the first averaged epoch starts with a fresh optimiser state (no
momentum carried over), as its code builds a new optimiser for SWA. From the first averaged epoch on, the averaged
model is what the engine evaluates and writes as ``checkpoint.pkl`` (``evaluated_model``); its batch-norm statistics
are recomputed (``update_bn``) on the defense images, plain (no crop or flip: the statistics of what evaluation feeds
it; its code runs its augmented training loader), in batches of ``--batch_size``, before each evaluation. The reported
result (``selected.pkl``, ``--retune``) is the *final* average, as its code reports it (``selection_start``): the
package's rule reads the training KD loss of the student, not of the average, and at the defaults (100 epochs,
``--select_from`` 50, averaging from 75) it could report a student from before averaging began (measured at 20 epochs
with ``--select_from 15``, where every selectable epoch is an average: docs/experiments.md).

Defaults from its ``scripts/Renofeation.sh``: SGD lr 0.01, momentum 0.9, weight decay 5e-3, batch 64. Ours:
100 epochs (its 120,000 iterations of batch 64 are about 380 epochs of 20,000 images; BCU's and Fine-Pruning's
re-training length here), so SWA averages epochs 75-99; the lr drop off. Not ported: its later commit's
learned 1x1 convolution on the student's features (added for students narrower than the teacher; here both
have the teacher's width) and the averaging every 500 iterations (here once per epoch).
"""
import math

import torch
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from helper.data.images import to_float
from helper.defenses.base import Defense, Stage, register_defense
from helper.run.cli import NONNEGATIVE, Option, Range
from helper.run.errors import UserError
from helper.run.system import autocast
from helper.train.features import FeatureHooks

GROUPS = "layer1,layer2,layer3,layer4"


def feature_distillation_loss(student_feats, teacher_feats):
    """``sum_l mean_{n,c,h,w} (S_l - T_l)^2`` over aligned sequences of feature maps (fp32; the teacher's carry no
    gradient): the feature term of Renofeation (its ``MSELoss()`` per group, summed), before the weight lambda."""
    terms = [(s.float() - t.detach().float()).pow(2).mean() for s, t in zip(student_feats, teacher_feats, strict=True)]
    return torch.stack(terms).sum()


def head_l2_penalty(model, beta):
    """``beta / 2 * sum over the model's Linear layers of (||W||^2 + ||b||^2)``: its code's L2 on the head."""
    total = sum(m.weight.float().pow(2).sum() + (m.bias.float().pow(2).sum() if m.bias is not None else 0.0)
                for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 0.5 * beta * total


def swa_start_epoch(value, epochs):
    """The first averaged epoch: ``floor(value * epochs)`` for a fraction ``0 <= value < 1``, else ``value`` itself
    as an epoch number (a whole number). A start at or past ``epochs`` means no averaging."""
    if value < 0 or (value >= 1 and value != int(value)):
        raise UserError(f"--reno_swa_start must be a fraction in [0, 1) or a whole epoch number, not {value}")
    return math.floor(value * epochs) if value < 1 else int(value)


def add_spatial_dropout(model, layers, p):
    """Forward hooks on the named modules of ``model`` that pass each one's output ``F`` through
    ``Dropout2d(p)`` while that module trains (whole channels set to 0 with probability p, the others scaled by
    1 / (1 - p)); in eval mode ``F`` is unchanged. Registered after a ``FeatureHooks`` on the same modules, the
    captured feature is the one before dropout. Returns the handles."""
    drop = torch.nn.Dropout2d(p)
    modules = dict(model.named_modules())

    def hook(module, inputs, output):
        drop.train(module.training)
        return drop(output)
    return [modules[name].register_forward_hook(hook) for name in layers]


def plain_batches(images, batch_size):
    """The uint8 defense images as float batches in their order, without augmentation."""
    for i in range(0, len(images), batch_size):
        yield to_float(images[i:i + batch_size])


@register_defense
class Renofeation(Defense):
    name = "renofeation"
    label = "Renofeation"
    help = ("Renofeation: a fresh student learns the teacher's logits (KD) and residual-group features under "
            "spatial dropout; stochastic weight averaging over the last epochs")
    defaults = {"using_checkpoint": 0, "opt_lr": 0.01, "weight_decay": 5e-3, "batch_size": 64, "epoch": 100,
                "lr_schedule": "cosine", "lr_drop": "off", "temperature": 1.0, "kd_reduction": "batchmean"}

    options = (
        Option("--reno_layers", GROUPS, "modules whose outputs are compared (comma-separated)", type=str),
        Option("--reno_feat_weight", 5.0, "lambda: weight of sum_l mean((F_s,l - F_t,l)^2) (its script: 5; 1 on "
               "CUB-200)", range=NONNEGATIVE),
        Option("--reno_dropout", 0.1, "Dropout2d rate on the output of each of --reno_layers in the student's "
               "training forward", range=Range(0, 1, high_open=True)),
        Option("--reno_head_l2", 0.01, "beta: beta/2 * (||W||^2 + ||b||^2) of the linear head is added to the loss",
               range=NONNEGATIVE),
        Option("--reno_swa_start", 0.75, "first epoch of weight averaging: a fraction in [0, 1) of --epoch (floored), "
               "or a whole epoch number >= 1; at or past --epoch: no averaging", range=NONNEGATIVE),
        Option("--reno_swa_lr", 5e-3, "constant lr of the averaged epochs (SWALR)", range=NONNEGATIVE),
        Option("--reno_swa_anneal", 0, "epochs over which SWALR anneals (cosine) from the lr then to --reno_swa_lr; "
               "0: at once", type=int, range=NONNEGATIVE),
    )

    @classmethod
    def check(cls, args):
        super().check(args)
        swa_start_epoch(args.reno_swa_start, args.epoch)  # a whole number from 1 on
        if not [s for s in args.reno_layers.split(",") if s.strip()]:
            raise UserError("--reno_layers names no module (default: layer1,layer2,layer3,layer4)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # built by stages(): the student, its weight average and SWALR, the feature hooks and the dropout hooks
        self.student = self.swa = self.swa_scheduler = self._optimizer = None
        self.hooks, self.dropout, self._bn_for, self.start = [], [], -1, None

    def swa_start(self):
        """The first averaged epoch; ``--epoch`` (none) with ``--opt_lr 0``, which trains nothing."""
        a, c = self.args, self.config
        return swa_start_epoch(c.reno_swa_start, a.epoch) if a.opt_lr > 0 else a.epoch

    def selection_start(self, select_from):
        """With averaging, the result is the final average (epoch ``--epoch`` - 1), as Renofeation's code reports it;
        the lowest training KD loss (the student's, not the average's) could pick an epoch before averaging began."""
        return self.args.epoch - 1 if self.swa_start() < self.args.epoch else select_from

    def selection_note(self, asked, effective):
        if self.swa_start() < self.args.epoch:
            return (f"renofeation reports its final weight average (epoch {effective}, averaged from epoch "
                    f"{self.swa_start()}), not the lowest-KD epoch from --select_from {asked}")
        return super().selection_note(asked, effective)

    def prepare(self, student):
        start = self.swa_start()
        return {"reno_swa_start_epoch": start if start < self.args.epoch else None}

    def stages(self, student):
        a, c = self.args, self.config
        layers = [s.strip() for s in c.reno_layers.split(",") if s.strip()]
        self.student, self.start = student, self.swa_start()
        self.swa, self.swa_scheduler, self._bn_for = AveragedModel(student), None, -1  # copied before any hook
        self.hooks = [FeatureHooks(student, layers), FeatureHooks(self.teacher, layers)]
        self.set_hooks(False)
        self.dropout = add_spatial_dropout(student, self.hooks[0].layers, c.reno_dropout)
        self._optimizer = optimizer = self.optimizer(student.parameters())

        def loss(s, t, x):
            s_feats, t_feats = self.hooks[0].pop(), self.hooks[1].pop()
            names = self.hooks[0].layers
            feat = c.reno_feat_weight * feature_distillation_loss([s_feats[n] for n in names],
                                                                  [t_feats[n] for n in names])
            head = head_l2_penalty(student, c.reno_head_l2)
            return self.kd(s, t) + feat + head, {"feat_loss": feat.detach(), "head_l2": head.detach()}
        step = self.distill_step(student, self.teacher, loss, optimizer)
        before = self.make_stage("", min(self.start, a.epoch), student, optimizer, step)  # --lr_schedule before SWA

        def begin(epoch):
            self.set_hooks(True)
            if epoch < self.start:
                return {**before.begin(epoch), "swa": 0}
            if self.swa_scheduler is None:  # the first averaged epoch: a fresh optimiser, as its code starts SWA with
                optimizer.state.clear()      # (no momentum carried over from the cosine phase)
                self.swa_scheduler = self.make_swa_scheduler()
            return {"lr": optimizer.param_groups[0]["lr"], "swa": 1}

        def end(epoch, means):
            self.set_hooks(False)
            if epoch < self.start:
                before.end(epoch, means)
                return
            self.swa.update_parameters(student)
            self.swa_scheduler.step()
        return [Stage("", a.epoch, student, optimizer, step, begin, end, before.lr_drop)]

    def make_swa_scheduler(self):
        return SWALR(self._optimizer, self.config.reno_swa_lr, anneal_epochs=self.config.reno_swa_anneal)

    def set_hooks(self, on):
        """Features are kept only during the training epochs (not during evaluation or diagnostics)."""
        for h in self.hooks:
            h.enabled = on

    def recompute_bn(self):
        """``update_bn`` of the averaged model on the plain defense images: every batch-norm's statistics reset,
        then set to the plain average over batches of each batch's mean and (unbiased) variance (momentum None)."""
        if self.images is None:
            raise ValueError("renofeation recomputes the averaged model's batch-norm statistics on the defense images: "
                             "pass images to the defense")
        with autocast(self.device, self.amp):
            update_bn(plain_batches(self.images, self.args.batch_size), self.swa.module)

    def evaluated_model(self, model):
        """The averaged model (batch-norm statistics recomputed once per new average) for the student once an
        average exists; ``model`` otherwise."""
        swa = self.swa
        if swa is None or model is not self.student:
            return model
        n = int(swa.n_averaged)
        if n == 0:
            return model
        if n != self._bn_for:
            self.recompute_bn()
            self._bn_for = n
        return swa.module

    def state(self):
        if self.swa is None:
            return {}
        state = {"swa": {k: v.detach().cpu() for k, v in self.swa.state_dict().items()}}
        if self.swa_scheduler is not None:
            state["swa_scheduler"] = self.swa_scheduler.state_dict()
        return state

    def restore(self, state):
        if "swa" in state:
            self.swa.load_state_dict(state["swa"])
            self._bn_for = -1
        if "swa_scheduler" in state:
            self.swa_scheduler = self.make_swa_scheduler()
            self.swa_scheduler.load_state_dict(state["swa_scheduler"])

    def close(self):
        for h in self.hooks:
            h.remove()
        for handle in self.dropout:
            handle.remove()
        self.hooks, self.dropout = [], []
