"""What every attack of adba.py shares: its dataset, checked against the target, and its metrics line."""
from helper.data import images as D
from helper.run.errors import UserError


def load_data(args):
    """(train, test, num_classes) of the attack's dataset, checked against --target_label."""
    train, test = D.load_splits(args.dataset, data_root=args.data_root, role="task", download=not args.no_download,
                                synthetic_seed=args.synthetic_seed, synthetic_train=args.synthetic_train,
                                synthetic_test=args.synthetic_test)
    if len(train) < 2 or len(test) < 1:
        raise UserError(f"{args.dataset} has {len(train)} training and {len(test)} test images; the attack needs "
                        f"at least 2 and 1")
    num_classes = D.NUM_CLASSES.get(args.dataset, int(max(train.y.max(), test.y.max())) + 1)
    if int(train.y.min()) < 0:
        raise UserError(f"{args.dataset} has negative labels")
    if args.target_label >= num_classes:
        raise UserError(f"--target_label {args.target_label} is not a class of {args.dataset} ({num_classes} classes)")
    return train, test, num_classes


def metrics_text(m, vanished):
    """One line of a model's Acc and ASR; with ``vanished`` the ASR is shown as a bias, not a backdoor."""
    asr = f"asr {m['asr']:.4f}  asr_nt {m['asr_nontarget']:.4f}"
    return f"acc {m['acc']:.4f}  " + (f"[{asr}: no trigger, a bias only]" if vanished else asr)
