"""adba.py's parser: the ADBA teacher (SPEC section 8, the default) and the poisoned-data teachers of
``helper.attacks.poison``, with ``--attack``'s own defaults."""
import argparse

from helper.attacks.base import ATTACKS  # adba.py --attack: every registered attack (helper/attacks/*.py)
from helper.run.cli import (
    TEMPERATURES,
    add_output_args,
    add_synthetic_args,
    add_system_args,
    nonneg_value,
    rate_value,
    unit_value,
)
from helper.run.errors import UserError


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
    g.add_argument("--target_label", "--target_label_backdoor", type=int, default=0, help="the backdoor's target class")
    g.add_argument("--trigger_dir", default=None,
                   help="--attack none only: also measure the clean teacher's ASR with the trigger (pattern.pt, "
                        "mask.pt) of this teacher folder (the floor a backdoored teacher's ASR is read against); "
                        "the trigger is not copied into the clean teacher's folder")
    add_synthetic_args(g)

    g = p.add_argument_group("Model")
    g.add_argument("--width", type=int, default=64,
                   help="ResNet18 base width of teacher and shadow (64 is the standard model; 8-16 for a CPU)")

    g = p.add_argument_group("Attack")
    g.add_argument("--attack", default="adba", choices=sorted(ATTACKS),
                   help="; ".join(f"{a.name}: {a.help}" for a in ATTACKS.values()))
    g.add_argument("--alpha", "--alpha_backdoor", type=unit_value, default=0.4,
                   help="shadow loss = alpha * KD(shadow, teacher) + (1 - alpha) * CE")
    g.add_argument("--beta", "--beta_backdoor", type=nonneg_value, default=0.3,
                   help="teacher loss = CE(clean) + beta * CE(triggered -> target)")
    g.add_argument("--miu", "--mu", type=nonneg_value, default=0.1,
                   help="weight of the mask's L1 norm (a sum over its 1024 pixels) in the trigger loss; each step "
                        "pulls every mask pixel toward 0 by lr * miu: too large and the trigger vanishes")
    g.add_argument("--mask_max", "--mask_clamp", type=unit_value, default=0.3,
                   help="the mask is clamped to [0, mask_max] after every step (1.0 = the original ADBA's [0, 1])")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="temperature of the shadow's KD term (the public ADBA code's T = 1; the defense distils at 40)")
    g.add_argument("--kd_reduction", default="batchmean", choices=["mean", "batchmean"],
                   help="batchmean: per-sample KL, as the public ADBA code's kldiv; mean: KL / (batch x classes)")
    g.add_argument("--detach_shadow_kd", action="store_true",
                   help="reproduce the public ADBA code: both inputs of the shadow's KD term are detached, so the "
                        "shadow never learns from the teacher and trains on (1 - alpha) * CE alone")
    g.add_argument("--poison_rate", type=rate_value, default=0.3,
                   help="adba's consolidation phase: the first poison_rate of every batch carries the trigger and the "
                        "target label; badnets and blended: the share of the training set poisoned, a fixed subset "
                        "drawn once with --seed from every class (default 0.1 there)")
    g.add_argument("--consolidation_epochs", type=int, default=None,
                   help="epochs of the consolidation phase (default: --epochs; 0 skips it)")
    g.add_argument("--vanish_psnr", type=float, default=50.0,
                   help="the trigger counts as vanished when no mask pixel exceeds 0.01 or the PSNR between clean "
                        "and triggered test images is at least this (dB)")

    g = p.add_argument_group("Optimisation")
    g.add_argument("--epochs", type=int, default=100, help="epochs of the joint teacher / shadow / trigger phase")
    g.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of teacher and shadow (the public code's default)")
    g.add_argument("--trigger_lr", type=float, default=None, help="SGD learning rate of pattern and mask (default: --lr)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of the three optimisers")
    g.add_argument("--weight_decay", type=float, default=0.0,
                   help="weight decay of teacher and shadow (badnets, blended, none: 5e-4 by default)")
    g.add_argument("--lr_schedule", default="none", choices=["none", "cosine"],
                   help="none: constant lr (adba accepts only this); cosine: annealed to 0 over --epochs, "
                        "BackdoorBench's, the default of badnets, blended and none")
    g.add_argument("--batch_size", type=int, default=128, help="training images per step")

    add_output_args(p)

    add_system_args(p)
    return p


def check_attack_args(args):
    """Range checks of adba.py's arguments argparse cannot express; a UserError names the flag."""
    for name in ("batch_size", "epochs", "width", "eval_batch_size", "checkpoint_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.consolidation_epochs is not None and args.consolidation_epochs < 0:
        raise UserError(f"--consolidation_epochs must be >= 0, not {args.consolidation_epochs}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, not {args.lr}")
    if not TEMPERATURES[0] <= args.temperature <= TEMPERATURES[1]:
        raise UserError(f"--temperature must be in [{TEMPERATURES[0]}, {TEMPERATURES[1]}], not {args.temperature}")
    if args.trigger_lr is not None and not args.trigger_lr > 0:
        raise UserError(f"--trigger_lr must be positive, not {args.trigger_lr}")
    if args.mask_max <= 0:
        raise UserError("--mask_max must be above 0: a mask clamped to [0, 0] is no trigger")
    if args.target_label < 0:
        raise UserError(f"--target_label must be >= 0, not {args.target_label}")
    if not args.weight_decay >= 0:
        raise UserError(f"--weight_decay must be >= 0, not {args.weight_decay}")
    attack = ATTACKS.get(getattr(args, "attack", "adba"))
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
