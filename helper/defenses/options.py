"""distri.py's parser: the shared groups, Model, Distillation, Optimisation, the chosen defense's own group and
the re-tuning attack; ``defense_parser`` puts the defense's own defaults on top of the package's."""
import argparse

from helper.defenses import DEFENSES
from helper.defenses.nc import SCAN_BATCH, SCAN_IMAGES, add_inversion_args
from helper.run.cli import TEMPERATURES, add_data_args, add_output_args, add_system_args, eval_every_value
from helper.run.errors import UserError

AUTO = "auto"  # --defense auto: scan, choose a defense from the verdict, run it, scan the student (helper.jobs.auto)


def choices():
    """``--defense``'s values: every registered defense, and auto."""
    return sorted(DEFENSES) + [AUTO]


def description():
    """distri.py's description, its defenses named from the registry."""
    others = ", ".join(n for n in sorted(DEFENSES) if n not in ("asd", "kd"))
    return ("Clean a backdoored teacher by distillation: ASD (the default), plain KD (--ratio_type fix or --defense kd) "
            f"and the field's baselines (--defense {others}); --defense auto scans the teacher and chooses")


def get_args_parser(add_help=True, defense="asd"):
    """The parser of distri.py with ``defense``'s own group; its defaults are the parser's until ``defense_parser``."""
    p = argparse.ArgumentParser(
        description=description(), add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    add_data_args(p)

    g = p.add_argument_group("Model")
    g.add_argument("--width", type=int, default=None,
                   help="ResNet18 base width (64 is the standard model); default: read from the checkpoint")
    g.add_argument("--using_checkpoint", type=int, default=1, choices=[0, 1],
                   help="1: the student starts from the teacher's weights; 0: from fresh weights")

    g = p.add_argument_group("Distillation")
    g.add_argument("--defense", default=defense, choices=choices(),
                   help="the defense to run; its own flags are listed in its group below (see --defense NAME --help); "
                        "auto: scan the teacher (no trigger read), run the defense its verdict calls for, scan the student")
    g.add_argument("--temperature", type=float, default=40.0,
                   help="KD temperature T (of the selection quantity kd_loss, and of the defense's KD term)")
    g.add_argument("--kd_reduction", default="mean", choices=["mean", "batchmean"],
                   help="mean: KL / (batch x classes), the public code's scale the lr and the 1.0 threshold "
                        "were tuned on; batchmean: the textbook per-sample KL")
    g.add_argument("--eval_every", type=eval_every_value, default=1, metavar="N|auto",
                   help="evaluate on the test set every N epochs and at the last (selection reads the KD loss of "
                        "every epoch; the selected state is evaluated in full at the end if its epoch was skipped); "
                        "auto: 1 on CUDA, 5 on the CPU, decided by the run on its own device (reproduce.py's default)")
    g.add_argument("--select_from", type=int, default=50,
                   help="the result is taken at the epoch >= this with the lowest mean KD loss "
                        "(over all epochs when the run is shorter)")

    g = p.add_argument_group("Optimisation")
    g.add_argument("--opt_type", default="SGD", choices=["SGD", "Adam"], help="optimiser")
    g.add_argument("--opt_lr", type=float, default=1e-3, help="learning rate (the loss multiplier of 10/20 "
                                                              "in scheduler mode acts on top of it under SGD)")
    g.add_argument("--opt_mo", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=0.0, help="weight decay of the optimiser")
    g.add_argument("--batch_size", type=int, default=128, help="defense images per step")
    g.add_argument("--epoch", "--epochs", type=int, default=300, help="training epochs (of the defense's last stage)")
    g.add_argument("--opt_nesterov", type=int, default=0, choices=[0, 1], help="1: Nesterov momentum (SGD)")
    g.add_argument("--lr_schedule", default="none", choices=["none", "cosine", "step"],
                   help="none: constant lr (the --lr_drop rule aside); cosine: annealed to 0 over --lr_period epochs; "
                        "step: times --lr_gamma at each of --lr_milestones")
    g.add_argument("--lr_period", type=int, default=None,
                   help="cosine: T_max in epochs (default: the run's --epoch; BCU's code: 100 whatever the run's length)")
    g.add_argument("--lr_milestones", type=int, nargs="+", default=[150, 300, 600],
                   help="step: the epochs at which the lr is multiplied by --lr_gamma (ABD's code)")
    g.add_argument("--lr_gamma", type=float, default=0.5, help="step: the factor at each milestone")
    g.add_argument("--lr_drop", default="auto", choices=["auto", "on", "off"],
                   help="drop the lr to --lr_drop_to at the first epoch whose mean KD loss is at or below --lr_drop_kd "
                        "after one above it or, for ASD, after its shift phase; auto = on for 50,000+ images; only asd (and kd, "
                        "clp, fineprune, which train through it) has the drop: on is refused for the others")
    g.add_argument("--lr_drop_kd", type=float, default=1.0, help="KD-loss threshold of the lr drop")
    g.add_argument("--lr_drop_to", type=float, default=1e-4, help="learning rate after the drop")

    if defense == AUTO:
        add_inversion_args(p.add_argument_group(
            "Defense auto", "the scan before and after (scan.py's search); the chosen defense runs at its own defaults "
            "with the flags above"), images=SCAN_IMAGES, batch=SCAN_BATCH)
    else:
        cls = DEFENSES[defense]
        cls.add_args(p.add_argument_group(f"Defense {cls.name}", cls.help))

    g = p.add_argument_group(
        "Re-tuning attack", "after the run, fine-tune a copy of the selected student on a few labelled training images, "
        "some triggered (NeurIPS 2024, 'Superficial Safety of Backdoor Defense'): a backdoor only hidden comes back")
    g.add_argument("--retune", action="store_true",
                   help="run the re-tuning attack on a copy of the selected student (selected.pkl is kept as "
                        "selected) and add retune_acc, retune_asr, retune_asr_nontarget, retune_ra to results.json")
    g.add_argument("--retune_images", type=int, default=1000,
                   help="labelled images of --dataset's training split (a seeded subset: --seed) it fine-tunes on")
    g.add_argument("--retune_poison", type=int, default=5,
                   help="of those, how many non-target images carry the trigger and the target label")
    g.add_argument("--retune_epochs", type=int, default=5, help="epochs of the re-tuning (cross-entropy, crop+flip)")
    g.add_argument("--retune_lr", type=float, default=0.01, help="SGD learning rate of the re-tuning")
    g.add_argument("--retune_momentum", type=float, default=0.9, help="SGD momentum of the re-tuning")
    g.add_argument("--retune_batch", type=int, default=128, help="batch size of the re-tuning")

    g = add_output_args(p)
    g.add_argument("--demo", action="store_true",
                   help="run the whole story offline on synthetic data: train an ADBA teacher, distil it "
                        "with KD and with ASD, print one table. Sizes are fixed in helper/jobs/demo.py; --seed, --device, "
                        "--amp, --output_dir, --msg, --target_label, --synthetic_seed and --eval_batch_size apply")

    add_system_args(p)
    return p


def defense_parser(argv=None, **defaults):
    """distri.py's parser for the defense ``argv`` names (``--defense``, default asd), with that defense's
    defaults (its own paper's) on top of the package's and ``defaults`` (of a variant entry point) on top of
    those; a flag given on the command line wins over all of them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--defense", default=defaults.get("defense", "asd"), choices=choices())
    name = pre.parse_known_args(argv)[0].defense
    parser = get_args_parser(defense=name)
    parser.set_defaults(**(DEFENSES[name].defaults if name != AUTO else {}))
    parser.set_defaults(**defaults)
    return parser


def check_args(args):
    """Range checks argparse cannot express, the shared flags' and then the defense's own (``Defense.check``); a
    UserError names the flag."""
    for name in ("batch_size", "eval_batch_size", "checkpoint_every", "eval_every"):
        if getattr(args, name, None) not in (None, "auto") and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.epoch < 0:
        raise UserError(f"--epoch must be >= 0 (0: no training, the prepared student is the result), not {args.epoch}")
    if not TEMPERATURES[0] <= args.temperature <= TEMPERATURES[1]:
        raise UserError(f"--temperature must be in [{TEMPERATURES[0]}, {TEMPERATURES[1]}], not {args.temperature} "
                        f"(softmax(logits / T) is one-hot below and uniform above: KD would be 0 or meaningless)")
    for name in ("opt_lr", "lr_drop_to", "weight_decay"):
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name} must be >= 0, not {getattr(args, name)}")
    if getattr(args, "lr_period", None) is not None and args.lr_period < 1:
        raise UserError(f"--lr_period must be at least 1, not {args.lr_period}")
    if not args.lr_drop_kd > 0:
        raise UserError(f"--lr_drop_kd must be positive, not {args.lr_drop_kd}")
    if args.thresh_mask is not None and not 0 <= args.thresh_mask < 1:
        raise UserError(f"--thresh_mask must be in [0, 1), not {args.thresh_mask}")
    if getattr(args, "width", None) is not None and args.width < 1:
        raise UserError(f"--width must be at least 1, not {args.width}")
    if getattr(args, "retune", False):
        for name in ("retune_images", "retune_epochs", "retune_batch"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name} must be at least 1, not {getattr(args, name)}")
        if not 0 <= args.retune_poison <= args.retune_images:
            raise UserError(f"--retune_poison must be in [0, --retune_images {args.retune_images}], not {args.retune_poison}")
        if not args.retune_lr > 0 or not args.retune_momentum >= 0:
            raise UserError(f"--retune_lr must be positive and --retune_momentum >= 0, not {args.retune_lr} and "
                            f"{args.retune_momentum}")
    if args.defense in DEFENSES:  # the defense's own flags (auto checks the scan's)
        DEFENSES[args.defense].check(args)
    return args
