"""Train an ADBA-backdoored teacher (SPEC section 8) and write the folder distri.py reads.

    python adba.py                                   # the paper's settings on CIFAR-10 (100 + 100 epochs)
    python adba.py --dataset synthetic --width 8 --epochs 3
    python adba.py --detach_shadow_kd                # the public ADBA code's shadow (learns from CE alone)
    python adba.py --attack badnets                  # BadNets (or blended): a poisoned training set, BackdoorBench's recipe
    python adba.py --attack none                     # a clean teacher trained the same way (no trigger files)

The folder holds checkpoint.pkl (a list holding one state dict), pattern.pt, mask.pt, results.json,
args.json, log.jsonl (one JSON line per epoch), curves.png and trigger.png; then
``python distri.py --read_dir <folder>``.
"""
from helper.attacks import ATTACKS
from helper.attacks.options import attack_parser
from helper.run.errors import exits_cleanly


@exits_cleanly
def main(argv=None):
    args = attack_parser(argv).parse_args(argv)
    return ATTACKS[args.attack].run(args)


if __name__ == "__main__":
    main()
