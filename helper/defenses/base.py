"""What a defense is to the engine: its name, its flags, what it does to the student, and its stages.

A defense is one file of this folder: a ``Defense`` subclass under ``@register_defense`` (``helper.defenses``
imports every file here, so the class is in ``DEFENSES`` and ``distri.py --defense NAME``, the table and
reproduce.py know it; docs/adding.md has a whole example). The engine (``helper.jobs.distill.run``) then

1. checks the run's flags (``check(args)``: each ``Option``'s range, then the defense's own rules), before any
   folder is made; the defense reads its own flags from ``self.config`` (``config_of(args)``: a frozen dataclass of
   its Options' values) and the shared ones from ``self.args`` (``helper.defenses.run_options.run_config_of(args)``:
   the frozen ``RunConfig`` of the flags no defense owns);
2. builds the student (the teacher's weights, or fresh ones with ``--using_checkpoint 0``);
3. calls ``prepare(student)`` (BCU re-initialises part of it) and records what it returns;
4. runs every ``Stage`` of ``stages(student)`` through ``helper.train.engine.fit``: per epoch ``begin(epoch)``
   (schedule values, logged), one pass of ``step(x)`` over the defense images (named loss tensors, no host
   sync; ``kd_loss`` is what selection reads), ``end(epoch, means)``, then evaluation of ``stage.model``.
   Only the last stage's epochs are selected from; an earlier one (NAD's teacher fine-tuning) is logged
   with its name in the ``stage`` column;
5. saves ``state()`` in ``last.pt`` after every epoch (``restore(state)`` on ``--resume``), evaluates and reports
   ``evaluated_model(model)``, and calls ``close()`` at the end, also after an error.

Every attribute a later method reads exists from ``__init__`` on (None or empty until ``prepare`` or ``stages``
builds it), so no method probes for another's attribute.
"""
from dataclasses import dataclass, make_dataclass
from typing import Callable

import torch
from tqdm import tqdm

from helper.data.images import to_float
from helper.defenses.run_options import run_config_of
from helper.run.cli import check_options
from helper.run.errors import UserError
from helper.run.system import autocast, use_compile
from helper.train.diagnostics import dead_units
from helper.train.engine import optimizer_step
from helper.train.losses import kd_loss
from helper.train.schedule import LrDrop, cosine_lr, step_lr

# BackdoorBench's fine-tuning recipe (SGD 0.01 with the package's momentum 0.9, weight decay 5e-4, cosine): the
# defaults of the defenses that fine-tune the student with an extra term (finetune, ibau, nc)
FINE_TUNING = {"opt_lr": 0.01, "weight_decay": 5e-4, "lr_schedule": "cosine", "lr_drop": "off"}


DEFENSES = {}  # name -> Defense subclass, filled by @register_defense as helper/defenses/__init__.py imports each file


def register_defense(cls):
    """Class decorator: ``cls`` becomes ``distri.py --defense cls.name``; a name is registered once."""
    if not cls.name or not cls.label or not cls.help:
        raise TypeError(f"{cls.__name__}: a registered defense sets name, label and help")
    if DEFENSES.get(cls.name, cls) is not cls:
        raise ValueError(f"--defense {cls.name} is registered twice ({DEFENSES[cls.name].__name__}, {cls.__name__})")
    DEFENSES[cls.name] = cls
    return cls


@dataclass
class Stage:
    name: str                     # "" for the student's stage, else logged in the ``stage`` column
    epochs: int
    model: torch.nn.Module        # the model this stage trains; evaluated after every epoch
    optimizer: torch.optim.Optimizer
    step: Callable                # step(x) -> {name: 0-d tensor}; ``kd_loss`` among them
    begin: Callable               # begin(epoch) -> {name: value}, logged (lr, temperature, ...)
    end: Callable                 # end(epoch, means) after the epoch's pass
    lr_drop: LrDrop


class Defense:
    """Base of every defense: shared helpers; subclasses set ``name``, ``defaults`` and ``stages``."""

    name = ""    # --defense NAME
    label = ""   # how tables and figures name it
    help = ""    # one line: its group's description in distri.py --help
    options = ()  # its own flags (``helper.run.cli.Option``): added to its group, their ranges checked by ``check``
    quiet = ()    # keys its stages log every epoch that the printed epoch line leaves out
    defaults = {}  # values of shared flags from the defense's own paper and public code; a given flag wins
    applies_lr_drop = False  # whether its stages follow --lr_drop (SPEC section 6: ASD's rule); else on is refused

    @classmethod
    def add_args(cls, group):
        """Add this defense's own flags to its argument group (called only when it is the chosen defense): its
        ``options``; a defense with flags argparse alone can describe adds them here too."""
        for option in cls.options:
            option.add_to(group)

    @classmethod
    def config_fields(cls):
        """The ``Option``s whose values make the defense's config: its ``options`` by default."""
        return cls.options

    @classmethod
    def config_class(cls):
        """The defense's typed config: a frozen dataclass with one field per ``config_fields()`` entry."""
        if "_config_class" not in cls.__dict__:
            cls._config_class = make_dataclass(
                f"{cls.__name__}Config", [(o.dest, list if o.nargs else o.type if isinstance(o.type, type) else object)
                                          for o in cls.config_fields()], frozen=True)
        return cls._config_class

    @classmethod
    def config_of(cls, args):
        """The config built from the command line (the one adapter from the parsed flags to a defense's own)."""
        return cls.config_class()(**{o.dest: getattr(args, o.dest) for o in cls.config_fields()})

    @classmethod
    def check(cls, args):
        """Refuse the run's flags in one UserError before any folder is made: every ``options`` range; a defense
        adds its own rules (one flag that needs another) on top."""
        check_options(cls.options, args)

    @classmethod
    def run_name(cls, args):
        """The run's name (its folder's, its curves' title): the defense's."""
        return cls.name

    @classmethod
    def run_label(cls, args):
        """How tables and figures name the run (``defense_label`` in results.json)."""
        return cls.label

    @classmethod
    def result_fields(cls, args):
        """Fields of the defense's own flags that results.json records beside the numbers; none by default."""
        return {}

    def run_meta(self):
        """What args.json records of the prepared defense (ASD: the hooked layers); none by default."""
        return {}

    def start_line(self):
        """A few words on the prepared defense for the run's first line, or ''."""
        return ""

    def warnings(self, args):
        """Warnings on the run's flags, one line each, printed and kept in results.json; none by default."""
        return []

    fp32_reason = "--amp bf16: this defense computes in fp32 with TF32 off; use --amp auto or fp32"

    @classmethod
    def needs_fp32(cls, args):
        """Whether the run must compute in fp32 with TF32 off (``--amp auto`` then means fp32 on every device): a loss
        that reads quantities bf16 or TF32 would round away (ASL). False by default; ``fp32_reason`` is the line that
        refuses ``--amp bf16`` then."""
        return False

    def __init__(self, args, teacher, device, amp, n_defense, images=None):
        # ``images``: the defense images (uint8 N x 3 x 32 x 32 on the device, as ``image_epoch`` takes them),
        # for a defense that looks at the data before training (ASD's --shift dormant, Fine-Pruning)
        self.config = self.config_of(args)  # the defense's own flags, typed
        self.args = run_config_of(args)  # the shared run options, typed: no defense's own flag is among them
        self.teacher, self.device, self.amp, self.images = teacher.eval(), device, amp, images
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.compile_losses = use_compile(device, args.compile)
        if args.lr_drop == "on" and not self.applies_lr_drop:
            raise UserError(f"--lr_drop on: --defense {self.name} has no lr drop (SPEC section 6's rule is ASD's: asd "
                            f"and the defenses that train through it, kd, clp, fineprune); leave --lr_drop at auto or off")
        self.lr_drop_enabled = self.applies_lr_drop and (
            args.lr_drop == "on" or (args.lr_drop == "auto" and n_defense >= 50000))
        self._probe = None  # the probe images, made on first use (``probe``)

    def prepare(self, student):
        """Change the student before training; returns a dict for results.json (empty by default)."""
        return {}

    def stages(self, student):
        raise NotImplementedError

    def probe(self, n=256):
        """The first ``n`` defense images as floats, no augmentation: what ``diagnostics`` looks at."""
        if self._probe is None:
            self._probe = to_float(self.images[:n])
        return self._probe

    def diagnostics(self, model):
        """Logged per epoch under ``diag``: the share of dead channels per unit (``helper.train.diagnostics.dead_units``:
        the stem and every block's bn1) on the probe images; ``{}`` without defense images."""
        if self.images is None:
            return {}
        return {"dead": dead_units(model, self.probe())}

    def state(self):
        """What the defense carries from step to step beyond the models and optimisers (ibau's delta), for
        ``--resume``'s last.pt; ``{}`` by default."""
        return {}

    def restore(self, state):
        """Take back what ``state()`` returned (``--resume``)."""

    def evaluated_model(self, model):
        """The model the engine evaluates after an epoch of training ``model``, keeps as the selected state
        (``selected.pkl``, ``--retune``) and writes as ``checkpoint.pkl``: ``model`` itself by default; a defense
        that reports another one of the same architecture returns it, ready to evaluate (renofeation: its weight
        average, batch-norm statistics recomputed)."""
        return model

    def selection_start(self, select_from):
        """The first epoch the reported result may be selected from, given the run's (``--select_from``, or 0 for a
        run not longer than it): unchanged by default; a defense whose reported model exists only from some epoch
        on moves it there (renofeation: its final weight average)."""
        return select_from

    def selection_note(self, asked, effective):
        """One line on why selection starts at ``effective`` and not at ``--select_from`` ``asked``."""
        return (f"the run has {self.args.epoch} epochs, not more than --select_from {asked}: the result is selected "
                f"over all epochs")

    def close(self):
        """Release hooks and the like at the end of the run."""

    # ---------------------------------------------------------------- helpers for subclasses

    def logits(self, model, x, input_grad=False):
        """The model's logits under the run's autocast (no gradient if it is the frozen teacher, unless
        ``input_grad``: a perturbation search differentiates the teacher's answer with respect to its input)."""
        with autocast(x.device, self.amp):
            if model is self.teacher and not input_grad:
                with torch.no_grad():
                    return model(x)
            return model(x)

    def kd(self, s_logits, t_logits):
        """The package's KD loss (``--temperature``, ``--kd_reduction``): the quantity selection reads."""
        return kd_loss(s_logits, t_logits, self.args.temperature, self.args.kd_reduction)

    def optimizer(self, params, lr=None):
        a = self.args
        lr = a.opt_lr if lr is None else lr
        if a.opt_type == "SGD":
            return torch.optim.SGD(params, lr=lr, momentum=a.opt_mo, weight_decay=a.weight_decay,
                                   nesterov=bool(getattr(a, "opt_nesterov", 0)))
        return torch.optim.Adam(params, lr=lr, weight_decay=a.weight_decay)

    def make_stage(self, name, epochs, model, optimizer, step, begin=None, drop=False, arm_epoch=None):
        """A ``Stage`` whose learning rate follows ``--lr_schedule`` (none; cosine over ``--lr_period`` epochs,
        default ``epochs``; step at ``--lr_milestones``) and, when ``drop``, drops to ``--lr_drop_to`` once the mean
        KD loss is at ``--lr_drop_kd`` after exceeding it or from ``arm_epoch`` on (SPEC section 6, ``LrDrop``).
        ``begin(epoch)`` adds the defense's own schedule values to the logged ones."""
        a, base = self.args, optimizer.param_groups[0]["lr"]
        lr_drop = LrDrop(optimizer, a.lr_drop_kd, a.lr_drop_to, enabled=drop, arm_epoch=arm_epoch)
        period = getattr(a, "lr_period", None) or epochs

        def begin_epoch(epoch):
            logged = begin(epoch) if begin else {}
            if a.lr_schedule != "none" and lr_drop.dropped_at is None:
                lr = (cosine_lr(base, epoch, period) if a.lr_schedule == "cosine"
                      else step_lr(base, epoch, a.lr_milestones, a.lr_gamma))
                for group in optimizer.param_groups:
                    group["lr"] = lr
            return {**logged, "lr": optimizer.param_groups[0]["lr"]}

        def end_epoch(epoch, means):
            if lr_drop.step(epoch, means["kd_loss"]):
                tqdm.write(f"epoch {epoch}: mean KD loss {means['kd_loss']:.4f} <= {a.lr_drop_kd} with the drop armed: "
                           f"lr -> {a.lr_drop_to}")
        return Stage(name, epochs, model, optimizer, step, begin_epoch, end_epoch, lr_drop)

    def distill_step(self, model, source, loss_fn, optimizer):
        """A step whose loss is ``loss_fn(student_logits, source_logits) -> (loss, {name: tensor})``;
        ``kd_loss`` (student against ``source``) is added to the returned names."""
        def step(x):
            s_logits = self.logits(model, x)
            with torch.no_grad():
                t_logits = self.logits(source, x)
            loss, named = loss_fn(s_logits, t_logits, x)
            optimizer_step(optimizer, loss)
            return {"kd_loss": self.kd(s_logits.detach(), t_logits), **named}
        return step
