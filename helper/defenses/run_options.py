"""The options every defense run shares, declared once: the Model, Distillation, Optimisation and Re-tuning flags
(``Option``s with their ranges), the groups distri.py's parser puts around a defense's own (``add_shared_head``,
``add_shared_tail``), and the typed object a defense reads them from (``run_config_of``: its ``self.args``).
Below the defenses (``helper.defenses.base`` reads it), above ``helper.run.cli`` only."""
import argparse
import functools
from dataclasses import make_dataclass

from helper.run.cli import (AT_LEAST_ONE, NONNEGATIVE, POSITIVE, TEMPERATURES, Option, Range, add_data_args, add_options,
                            add_output_args, add_system_args, eval_every_value)

# The shared flags of a defense run, declared once with their ranges (``check_args`` checks them before any folder)
MODEL = (
    Option("--width", None, "ResNet18 base width (64 is the standard model); default: read from the checkpoint",
           type=int, range=AT_LEAST_ONE),
    Option("--using_checkpoint", 1, "1: the student starts from the teacher's weights; 0: from fresh weights", type=int,
           choices=(0, 1)),
)
DISTILLATION = (
    Option("--temperature", 40.0, "KD temperature T (of the selection quantity kd_loss, and of the defense's KD term)",
           range=Range(*TEMPERATURES)),
    Option("--kd_reduction", "mean", "mean: KL / (batch x classes), the public code's scale the lr and the 1.0 "
           "threshold were tuned on; batchmean: the textbook per-sample KL", type=str, choices=("mean", "batchmean")),
    Option("--eval_every", 1, "evaluate on the test set every N epochs and at the last (selection reads the KD loss of "
           "every epoch; the selected state is evaluated in full at the end if its epoch was skipped); auto: 1 on "
           "CUDA, 5 on the CPU, decided by the run on its own device (reproduce.py's default)", type=eval_every_value,
           metavar="N|auto"),
    Option("--select_from", 50, "the result is taken at the epoch >= this with the lowest mean KD loss (over all "
           "epochs when the run is shorter)", type=int),
)
OPTIMISATION = (
    Option("--opt_type", "SGD", "optimiser", type=str, choices=("SGD", "Adam")),
    Option("--opt_lr", 1e-3, "learning rate (the loss multiplier of 10/20 in scheduler mode acts on top of it under "
           "SGD)", range=NONNEGATIVE),
    Option("--opt_mo", 0.9, "SGD momentum", range=NONNEGATIVE),
    Option("--weight_decay", 0.0, "weight decay of the optimiser", range=NONNEGATIVE),
    Option("--batch_size", 128, "defense images per step", type=int, range=AT_LEAST_ONE),
    Option("--epoch", 300, "training epochs (of the defense's last stage); 0: no training, the prepared student is the "
           "result", type=int, range=NONNEGATIVE, aliases=("--epochs",)),
    Option("--opt_nesterov", 0, "1: Nesterov momentum (SGD)", type=int, choices=(0, 1)),
    Option("--lr_schedule", "none", "none: constant lr (the --lr_drop rule aside); cosine: annealed to 0 over "
           "--lr_period epochs; step: times --lr_gamma at each of --lr_milestones", type=str,
           choices=("none", "cosine", "step")),
    Option("--lr_period", None, "cosine: T_max in epochs (default: the run's --epoch; BCU's code: 100 whatever the "
           "run's length)", type=int, range=AT_LEAST_ONE),
    Option("--lr_milestones", (150, 300, 600), "step: the epochs at which the lr is multiplied by --lr_gamma (ABD's "
           "code)", type=int, nargs="+"),
    Option("--lr_gamma", 0.5, "step: the factor at each milestone", range=NONNEGATIVE),
    Option("--lr_drop", "auto", "drop the lr to --lr_drop_to at the first epoch whose mean KD loss is at or below "
           "--lr_drop_kd after one above it or, for ASD, after its shift phase; auto = on for 50,000+ images; only asd "
           "(and kd, clp, fineprune, which train through it) has the drop: on is refused for the others", type=str,
           choices=("auto", "on", "off")),
    Option("--lr_drop_kd", 1.0, "KD-loss threshold of the lr drop", range=POSITIVE),
    Option("--lr_drop_to", 1e-4, "learning rate after the drop", range=NONNEGATIVE),
)
RETUNING = (  # checked only with --retune
    Option("--retune_images", 1000, "labelled images of --dataset's training split (a seeded subset: --seed) it "
           "fine-tunes on", type=int, range=AT_LEAST_ONE),
    Option("--retune_poison", 5, "of those, how many non-target images carry the trigger and the target label",
           type=int, range=NONNEGATIVE),
    Option("--retune_epochs", 5, "epochs of the re-tuning (cross-entropy, crop+flip)", type=int, range=AT_LEAST_ONE),
    Option("--retune_lr", 0.01, "SGD learning rate of the re-tuning", range=POSITIVE),
    Option("--retune_momentum", 0.9, "SGD momentum of the re-tuning", range=NONNEGATIVE),
    Option("--retune_batch", 128, "batch size of the re-tuning", type=int, range=AT_LEAST_ONE),
)


def add_shared_head(p, defense_flag):
    """Data, Model, Distillation (``defense_flag(group)`` adds ``--defense`` first) and Optimisation."""
    add_data_args(p)
    add_options(p.add_argument_group("Model"), MODEL)
    g = p.add_argument_group("Distillation")
    defense_flag(g)
    add_options(g, DISTILLATION)
    add_options(p.add_argument_group("Optimisation"), OPTIMISATION)


def add_shared_tail(p):
    """Re-tuning attack, Output (with ``--config`` and ``--demo``) and System."""
    g = p.add_argument_group(
        "Re-tuning attack", "after the run, fine-tune a copy of the selected student on a few labelled training images, "
        "some triggered (NeurIPS 2024, 'Superficial Safety of Backdoor Defense'): a backdoor only hidden comes back")
    g.add_argument("--retune", action="store_true",
                   help="run the re-tuning attack on a copy of the selected student (selected.pkl is kept as "
                        "selected) and add retune_acc, retune_asr, retune_asr_nontarget, retune_ra to results.json")
    add_options(g, RETUNING)

    g = add_output_args(p)
    g.add_argument("--config", default=None, metavar="FILE",
                   help="a JSON (or, with PyYAML, YAML) mapping of flag names to values, taken as defaults (over the "
                        "defense's own); a flag on the command line wins; docs/usage.md has an example")
    g.add_argument("--demo", action="store_true",
                   help="run the whole story offline on synthetic data: train an ADBA teacher, distil it "
                        "with KD and with ASD, print one table. Sizes are fixed in helper/jobs/demo.py; --seed, --device, "
                        "--amp, --output_dir, --msg, --target_label, --synthetic_seed and --eval_batch_size apply")
    add_system_args(p)


def shared_parser():
    """The shared flags alone, in a parser of their own (what ``RunConfig`` is made of)."""
    p = argparse.ArgumentParser(add_help=False)
    add_shared_head(p, lambda g: g.add_argument("--defense", default="asd"))
    add_shared_tail(p)
    return p


@functools.lru_cache(maxsize=None)
def run_config_class():
    """The shared run options as one typed object: a frozen dataclass with a field per flag of distri.py that is no
    defense's own (Data, Model, Distillation, Optimisation, Re-tuning, Output, System: ``shared_parser``'s), typed
    by its ``Option``, its argparse type or its default."""
    fields = []
    for action in shared_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        kind = (bool if isinstance(action, argparse._StoreTrueAction) else list if action.nargs in ("+", "*")
                else action.type if isinstance(action.type, type) else object if action.type is not None
                else type(action.default) if action.default is not None else object)
        fields.append((action.dest, kind))
    return make_dataclass("RunConfig", fields, frozen=True)


def run_config_of(args):
    """The shared run options of a parsed command line (``run_config_class``): what a defense reads as
    ``self.args``; its own flags are ``self.config``, no other defense's are reachable."""
    cls = run_config_class()
    return cls(**{f: getattr(args, f) for f in cls.__dataclass_fields__})
