"""distri.py's parser: the shared groups (``helper.defenses.run_options``: Data, Model, Distillation, Optimisation),
the chosen defense's own group, then the shared Re-tuning, Output and System; ``defense_parser`` puts the defense's
own defaults on top of the package's, and ``--config FILE``'s on top of those."""
import argparse

from helper.defenses import DEFENSES
from helper.defenses.nc import SCAN_BATCH, SCAN_IMAGES, add_inversion_args
from helper.defenses.run_options import DISTILLATION, MODEL, OPTIMISATION, RETUNING, add_shared_head, add_shared_tail
from helper.run.cli import check_options, config_defaults, read_config
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

    def defense_flag(group):
        group.add_argument("--defense", default=defense, choices=choices(),
                           help="the defense to run; its own flags are listed in its group below (see --defense NAME "
                                "--help); auto: scan the teacher (no trigger read), run the defense its verdict calls "
                                "for, scan the student")

    add_shared_head(p, defense_flag)
    if defense == AUTO:
        add_inversion_args(p.add_argument_group(
            "Defense auto", "the scan before and after (scan.py's search); the chosen defense runs at its own defaults "
            "with the flags above"), images=SCAN_IMAGES, batch=SCAN_BATCH)
    else:
        cls = DEFENSES[defense]
        cls.add_args(p.add_argument_group(f"Defense {cls.name}", cls.help))
    add_shared_tail(p)
    return p


def defense_parser(argv=None, **defaults):
    """distri.py's parser for the defense ``argv`` names (``--defense``, default asd), with that defense's
    defaults (its own paper's) on top of the package's, ``defaults`` (of a variant entry point) on top of those and
    ``--config FILE``'s values (``helper.run.cli.read_config``) on top of those; a flag given on the command line
    wins over all of them (timm's two-pass parse)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(argv)[0].config
    values = read_config(path) if path else {}
    pre.add_argument("--defense", default=values.get("defense", defaults.get("defense", "asd")), choices=choices())
    name = pre.parse_known_args(argv)[0].defense
    parser = get_args_parser(defense=name)
    parser.set_defaults(**(DEFENSES[name].defaults if name != AUTO else {}))
    parser.set_defaults(**defaults)
    parser.set_defaults(**config_defaults(parser, values, path))
    return parser


def check_args(args):
    """Range checks argparse cannot express: the shared flags' (their ``Option``s, the re-tuning's with ``--retune``),
    the rules between them, then the defense's own (``Defense.check``); a UserError names the flag."""
    check_options(MODEL + DISTILLATION + OPTIMISATION + (RETUNING if args.retune else ()), args)
    for name in ("eval_batch_size", "checkpoint_every", "eval_every"):  # the system's and output's, and N of N|auto
        if getattr(args, name) not in (None, "auto") and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.thresh_mask is not None and not 0 <= args.thresh_mask < 1:
        raise UserError(f"--thresh_mask must be in [0, 1), not {args.thresh_mask}")
    if args.retune and args.retune_poison > args.retune_images:
        raise UserError(f"--retune_poison must be in [0, --retune_images {args.retune_images}], not {args.retune_poison}")
    if args.defense in DEFENSES:  # the defense's own flags (auto checks the scan's)
        DEFENSES[args.defense].check(args)
    return args
