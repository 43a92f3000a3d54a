"""adba.py's parser: the ADBA teacher (SPEC section 8, the default) and the poisoned-data teachers of
``helper.attacks.poison``, with ``--attack``'s own defaults."""
import argparse

from helper.attacks.base import ATTACKS  # adba.py --attack: every registered attack (helper/attacks/*.py)
from helper.run.cli import (
    AT_LEAST_ONE,
    NONNEGATIVE,
    POSITIVE,
    Option,
    add_options,
    add_output_args,
    add_synthetic_args,
    add_system_args,
    check_options,
    rate_value,
)
from helper.run.errors import UserError


# The shared flags of an attack run, declared once with their ranges (``check_attack_args`` checks them); an
# attack's own flags are in its file (``register_attack(..., options=...)``)
TARGET = (Option("--target_label", 0, "the backdoor's target class", type=int, range=NONNEGATIVE,
                 aliases=("--target_label_backdoor",)),)
MODEL = (Option("--width", 64, "ResNet18 base width of teacher and shadow (64 is the standard model; 8-16 for a CPU)",
                type=int, range=AT_LEAST_ONE),)
OPTIMISATION = (
    Option("--epochs", 100, "epochs of the joint teacher / shadow / trigger phase (badnets, blended, none: of "
           "training)", type=int, range=AT_LEAST_ONE),
    Option("--lr", 0.01, "SGD learning rate of teacher and shadow (the public code's default)", range=POSITIVE),
    Option("--momentum", 0.9, "SGD momentum of the three optimisers", range=NONNEGATIVE),
    Option("--weight_decay", 0.0, "weight decay of teacher and shadow (badnets, blended, none: 5e-4 by default)",
           range=NONNEGATIVE),
    Option("--lr_schedule", "none", "none: constant lr (adba accepts only this); cosine: annealed to 0 over --epochs, "
           "BackdoorBench's, the default of badnets, blended and none", type=str, choices=("none", "cosine")),
    Option("--batch_size", 128, "training images per step", type=int, range=AT_LEAST_ONE),
)


def get_attack_parser(add_help=True):
    """The parser of adba.py: the ADBA teacher of SPEC section 8 (``--attack adba``, the default) and the
    poisoned-data teachers of ``helper.attacks.poison``. Public-code names kept as aliases."""
    p = argparse.ArgumentParser(
        description="ADBA: train a backdoored teacher whose learned trigger survives distillation (SPEC section 8); "
                    "--attack badnets / blended: a teacher trained on a poisoned training set (BackdoorBench); "
                    "--attack none: a clean teacher trained the same way",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("Data")
    g.add_argument("--dataset", default="cifar10",
                   help="the teacher's task: cifar10 (torchvision, in --data_root), synthetic, or a path to an .npz file")
    g.add_argument("--data_root", default="data", help="dataset root; CIFAR downloads land here")
    g.add_argument("--no_download", action="store_true", help="never try to download a missing dataset")
    add_options(g, TARGET)
    g.add_argument("--trigger_dir", default=None,
                   help="--attack none only: also measure the clean teacher's ASR with the trigger (pattern.pt, "
                        "mask.pt) of this teacher folder (the floor a backdoored teacher's ASR is read against); "
                        "the trigger is not copied into the clean teacher's folder")
    add_synthetic_args(g)

    add_options(p.add_argument_group("Model"), MODEL)

    g = p.add_argument_group("Attack")
    g.add_argument("--attack", default="adba", choices=sorted(ATTACKS),
                   help="; ".join(f"{a.name}: {a.help}" for a in ATTACKS.values()))
    g.add_argument("--poison_rate", type=rate_value, default=0.3,
                   help="adba's consolidation phase: the first poison_rate of every batch carries the trigger and the "
                        "target label; badnets and blended: the share of the training set poisoned, a fixed subset "
                        "drawn once with --seed from every class (default 0.1 there)")
    for attack in ATTACKS.values():  # each attack's own flags, declared in its file (register_attack(options=...))
        if attack.options:
            add_options(p.add_argument_group(f"Attack {attack.name}", f"read by --attack {attack.name} only"),
                        attack.options)

    add_options(p.add_argument_group("Optimisation"), OPTIMISATION)

    add_output_args(p)

    add_system_args(p)
    return p


def check_attack_args(args):
    """Range checks of adba.py's arguments: the shared flags' ``Option``s, the system's, the attack's own flags'
    (its ``options``) and its own rules (its ``check``); a UserError names the flag."""
    attack = ATTACKS.get(getattr(args, "attack", "adba"))
    check_options(MODEL + TARGET + OPTIMISATION + (attack.options if attack is not None else ()), args)
    for name in ("eval_batch_size", "checkpoint_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, not {getattr(args, name)}")
    if attack is not None and attack.check is not None:  # the attack's own rules
        attack.check(args)
    return args


def own_trigger_only(args):
    """An attack with a trigger of its own is measured with it: ``--trigger_dir`` is for ``--attack none``."""
    if getattr(args, "trigger_dir", None) is not None:
        raise UserError(f"--trigger_dir is for --attack none (a clean teacher has no trigger of its own); an "
                        f"--attack {args.attack} teacher is measured with its own trigger")


def attack_parser(argv=None):
    """adba.py's parser with ``--attack``'s own defaults (the registered attack's: BackdoorBench's recipe for the
    poisoned-data attacks and ``none``); a flag given on the command line wins."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--attack", default="adba", choices=sorted(ATTACKS))
    parser = get_attack_parser()
    parser.set_defaults(**ATTACKS[pre.parse_known_args(argv)[0].attack].defaults)
    return parser


def attack_defaults(args):
    """The defaults of adba.py --attack ARGS.ATTACK (what a flag newer than a resumed attack run was, in effect)."""
    argv = ["--attack", getattr(args, "attack", "adba")]
    return vars(attack_parser(argv).parse_args(argv))
