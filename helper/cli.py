"""The one argument parser of the entry scripts (distri.py, distri_dsextend.py), grouped as a table of contents.

Names follow the public ASD code where it had them (``--finetunedata``, ``--opt_lr``, ``--epoch``, ...).
"""
import argparse

from helper.defenses import DEFENSES


TEMPERATURES = (0.05, 1000.0)  # KD temperatures a run accepts


def _rate(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value}")
    return value


def eval_every_value(text):
    """``--eval_every``: a number of epochs, or ``auto`` (``helper.system.eval_every`` decides on the run's device)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of epochs or auto, not {text!r}") from None


def add_system_args(parser):
    """Device, precision and seed: shared by every entry point, the attack and the benchmark too."""
    g = parser.add_argument_group("System")
    g.add_argument("--device", default="auto", help="auto (first CUDA GPU, else CPU), cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=0, help="seeds the subset, the augmentation and any fresh weights")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast precision of the forward passes; auto = bf16 on CUDA, fp32 on CPU. "
                        "Losses are always computed in fp32. No fp16: its gradients need a GradScaler, "
                        "which the engine does not have, and bf16 needs none")
    g.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="fuse the losses with torch.compile (falls back to eager with a warning if compiling fails); "
                        "auto = on for CUDA, off on the CPU (slow to start there); --compile alone = on")
    g.add_argument("--eval_batch_size", type=int, default=None,
                   help="batch size of evaluation under inference mode; default 2000 on CUDA, 256 on CPU "
                        "(on a 2-core CPU 256 evaluated 1.6x faster than 1000)")
    g.add_argument("--deterministic", action="store_true",
                   help="the same kernels every time: on CUDA cuDNN's benchmark off and its deterministic mode on, "
                        "deterministic algorithms where torch has them (CUBLAS_WORKSPACE_CONFIG set), so a resumed "
                        "run equals the run made straight through on a GPU too; slower. Off: cuDNN picks its fastest "
                        "kernels")
    return g


def add_output_args(parser, resumable=True):
    """Where a run writes and how it reports: shared by the defense, the attack and (``resumable`` False: no
    ``--resume``) the scan."""
    g = parser.add_argument_group("Output")
    g.add_argument("--output_dir", default=None, help="run folder (default: a new folder under runs/); "
                                                     "a folder that already holds files is refused")
    g.add_argument("--msg", default="", help="a note for this run, kept in args.json and the folder name")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bars (the JSON lines and epoch lines stay)")
    if not resumable:
        return g
    g.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --output_dir from its last completed epoch (last.pt); "
                        "the other arguments must be those it was started with")
    g.add_argument("--checkpoint_every", type=int, default=1,
                   help="write last.pt (what --resume continues from) every this many epochs")
    return g


def add_synthetic_args(group):
    group.add_argument("--synthetic_seed", type=int, default=0,
                       help="defines the synthetic task (keep it equal between the attack and the defense)")
    group.add_argument("--synthetic_train", type=int, default=10000, help="images in a synthetic train split")
    group.add_argument("--synthetic_test", type=int, default=2000, help="images in a synthetic test split")


def add_data_args(parser, trigger=True):
    """The teacher folder, the teacher's dataset and the defense images: shared by distri.py and scan.py;
    ``trigger``: also the flags of the trigger an ASR is measured with (not scan.py's)."""
    g = parser.add_argument_group("Data")
    g.add_argument("--read_dir", default=None,
                   help="folder with checkpoint.pkl, pattern.pt and mask.pt; when not given, read_dir at the top of distri.py")
    g.add_argument("--dataset", default="cifar10",
                   help="what the teacher was trained on; its test set measures Acc and ASR: "
                        "cifar10, cifar100, synthetic or a path to an .npz file")
    g.add_argument("--finetunedata", default="cifar100",
                   help="unlabelled defense data: cifar10, cifar100, synthetic (out-of-distribution generator) or .npz")
    g.add_argument("--finetune_in_out", default="out", choices=["in", "out"],
                   help="out: defense data from --finetunedata; in: from the teacher's own training set")
    g.add_argument("--subset_rate", type=_rate, default=0.1,
                   help="share of the defense pool used: 0.1 of CIFAR-100 train = 5,000 images, 1.0 = 50,000")
    g.add_argument("--defense_size", type=int, default=None,
                   help="exactly this many defense images (overrides --subset_rate): 5000, 50000, 60000 in the paper")
    g.add_argument("--finetune_extend", action="store_true",
                   help="pool = train + test of the defense data (60,000 for CIFAR-100); set by distri_dsextend.py")
    g.add_argument("--data_root", default="data", help="dataset root; CIFAR downloads land here")
    g.add_argument("--no_download", action="store_true", help="never try to download a missing dataset")
    if trigger:
        g.add_argument("--target_label", type=int, default=0, help="the backdoor's target class")
        g.add_argument("--thresh_mask", type=float, default=None, help="mask values <= this are set to 0 before use")
        g.add_argument("--trigger_dir", default=None,
                       help="measure ASR (and re-tune) with the trigger (pattern.pt, mask.pt) of this teacher folder "
                            "instead of --read_dir's own; needed for a clean teacher (adba.py --attack none), which has "
                            "none. The run folder then holds this trigger")
    add_synthetic_args(g)
    return g


def get_args_parser(add_help=True, defense="asd"):
    """The parser of distri.py with ``defense``'s own group; its defaults are the parser's until ``defense_parser``."""
    p = argparse.ArgumentParser(
        description="Clean a backdoored teacher by distillation: ASD (the default), plain KD (--ratio_type fix or "
                    "--defense kd) and the field's baselines (--defense bcu, nad, finetune, abd, clp, fineprune, ibau, sau, nc, "
                    "renofeation)",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    add_data_args(p)

    g = p.add_argument_group("Model")
    g.add_argument("--width", type=int, default=None,
                   help="ResNet18 base width (64 is the standard model); default: read from the checkpoint")
    g.add_argument("--using_checkpoint", type=int, default=1, choices=[0, 1],
                   help="1: the student starts from the teacher's weights; 0: from fresh weights")

    g = p.add_argument_group("Distillation")
    g.add_argument("--defense", default=defense, choices=sorted(DEFENSES),
                   help="the defense to run; its own flags are listed in its group below (see --defense NAME --help)")
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
                        "after one above it or, for ASD, after its shift phase; auto = on for 50,000+ images")
    g.add_argument("--lr_drop_kd", type=float, default=1.0, help="KD-loss threshold of the lr drop")
    g.add_argument("--lr_drop_to", type=float, default=1e-4, help="learning rate after the drop")

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
                        "with KD and with ASD, print one table. Sizes are fixed in helper/demo.py; --seed, --device, "
                        "--amp, --output_dir, --msg, --target_label, --synthetic_seed and --eval_batch_size apply")

    add_system_args(p)
    return p


def defense_parser(argv=None, **defaults):
    """distri.py's parser for the defense ``argv`` names (``--defense``, default asd), with that defense's
    defaults (its own paper's) on top of the package's and ``defaults`` (of a variant entry point) on top of
    those; a flag given on the command line wins over all of them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--defense", default=defaults.get("defense", "asd"), choices=sorted(DEFENSES))
    name = pre.parse_known_args(argv)[0].defense
    parser = get_args_parser(defense=name)
    parser.set_defaults(**DEFENSES[name].defaults)
    parser.set_defaults(**defaults)
    return parser


def check_args(args):
    """Range checks argparse cannot express; a UserError names the flag."""
    from helper.errors import UserError
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
    if hasattr(args, "eps") and not 0 < args.eps <= 1:
        raise UserError(f"--eps must be in (0, 1], not {args.eps}")
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
    return args


def _unit(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], not {value}")
    return value


def _nonneg(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


ATTACKS = ("adba", "badnets", "blended", "none")  # adba.py --attack; the last three are helper/attacks.py
# BackdoorBench's CIFAR-10 training recipe (config/attack/prototype/cifar10.yaml) and poisoning ratio: the defaults
# of --attack badnets, blended and none (adba keeps the public ADBA code's constant lr and no weight decay)
POISONING_DEFAULTS = {"poison_rate": 0.1, "weight_decay": 5e-4, "lr_schedule": "cosine"}


def get_attack_parser(add_help=True):
    """The parser of adba.py: the ADBA teacher of SPEC section 8 (``--attack adba``, the default) and the
    poisoned-data teachers of ``helper.attacks``. Public-code names kept as aliases."""
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
    g.add_argument("--attack", default="adba", choices=ATTACKS,
                   help="adba: the ADBA attack (SPEC section 8; the flags below from --alpha to --vanish_psnr, "
                        "--poison_rate aside, are its own). badnets: a 3x3 white patch in the bottom-right corner "
                        "(rows and columns 29-31). blended: 0.8 x + 0.2 * a fixed uniform-noise image (seed 1234; "
                        "BackdoorBench blends a Hello Kitty picture, which cannot be shipped here). Both poison a fixed "
                        "seeded --poison_rate of the training set, all-to-one to --target_label, the trigger stamped "
                        "after crop+flip (helper/attacks.py). none: a clean teacher, the same training without "
                        "poisoning, written without pattern.pt and mask.pt (defend it with distri.py --trigger_dir). "
                        "badnets, blended and none default to BackdoorBench's recipe: --poison_rate 0.1, "
                        "--weight_decay 5e-4, --lr_schedule cosine")
    g.add_argument("--alpha", "--alpha_backdoor", type=_unit, default=0.4,
                   help="shadow loss = alpha * KD(shadow, teacher) + (1 - alpha) * CE")
    g.add_argument("--beta", "--beta_backdoor", type=_nonneg, default=0.3,
                   help="teacher loss = CE(clean) + beta * CE(triggered -> target)")
    g.add_argument("--miu", "--mu", type=_nonneg, default=0.1,
                   help="weight of the mask's L1 norm (a sum over its 1024 pixels) in the trigger loss; each step "
                        "pulls every mask pixel toward 0 by lr * miu: too large and the trigger vanishes")
    g.add_argument("--mask_max", "--mask_clamp", type=_unit, default=0.3,
                   help="the mask is clamped to [0, mask_max] after every step (1.0 = the original ADBA's [0, 1])")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="temperature of the shadow's KD term (the public ADBA code's T = 1; the defense distils at 40)")
    g.add_argument("--kd_reduction", default="batchmean", choices=["mean", "batchmean"],
                   help="batchmean: per-sample KL, as the public ADBA code's kldiv; mean: KL / (batch x classes)")
    g.add_argument("--detach_shadow_kd", action="store_true",
                   help="reproduce the public ADBA code: both inputs of the shadow's KD term are detached, so the "
                        "shadow never learns from the teacher and trains on (1 - alpha) * CE alone")
    g.add_argument("--poison_rate", type=_rate, default=0.3,
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
    from helper.errors import UserError
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
    attack = getattr(args, "attack", "adba")
    if attack == "adba" and getattr(args, "lr_schedule", "none") != "none":
        raise UserError("--lr_schedule cosine is for --attack badnets, blended and none; the ADBA attack keeps the "
                        "public ADBA code's constant lr")
    if getattr(args, "trigger_dir", None) is not None and attack != "none":
        raise UserError(f"--trigger_dir is for --attack none (a clean teacher has no trigger of its own); an "
                        f"--attack {attack} teacher is measured with its own trigger")
    if not args.weight_decay >= 0:
        raise UserError(f"--weight_decay must be >= 0, not {args.weight_decay}")
    return args


def attack_parser(argv=None):
    """adba.py's parser with ``--attack``'s defaults: the poisoned-data attacks and ``none`` get
    ``POISONING_DEFAULTS`` (BackdoorBench's recipe); a flag given on the command line wins."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--attack", default="adba", choices=ATTACKS)
    parser = get_attack_parser()
    if pre.parse_known_args(argv)[0].attack != "adba":
        parser.set_defaults(**POISONING_DEFAULTS)
    return parser


def attack_defaults(args):
    """The defaults of adba.py --attack ARGS.ATTACK (what a flag newer than a resumed attack run was, in effect)."""
    argv = ["--attack", getattr(args, "attack", "adba")]
    return vars(attack_parser(argv).parse_args(argv))
