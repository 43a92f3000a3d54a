"""Attention Shifting Distillation of a backdoored teacher; ``--ratio_type fix`` is the plain-KD baseline.

    python distri.py                      # ASD on the folder named by read_dir below
    python distri.py --ratio_type fix     # plain KD
    python distri.py --defense bcu        # a baseline (--help lists every registered defense; --defense NAME --help
                                          #   its own flags; docs/adding.md: a new one is one file)
    python distri.py --defense auto       # scan the teacher (no trigger needed), run what the verdict calls for
    python distri.py --read_dir DIR       # another checkpoint folder
    python distri.py --demo               # the whole story offline, on synthetic data
"""
# The teacher to clean: a folder with checkpoint.pkl, pattern.pt and mask.pt, as adba.py writes it.
read_dir = "./checkpoints/adba_cifar10"

from helper.defenses.options import defense_parser  # noqa: E402
from helper.run.errors import exits_cleanly  # noqa: E402


@exits_cleanly
def main(argv=None, **defaults):
    """Parse ``argv`` (``defaults`` override the parser's, for variant entry points) and run."""
    args = defense_parser(argv, **defaults).parse_args(argv)
    if args.demo:
        from helper.jobs.demo import run_demo
        return run_demo(args)
    if args.read_dir is None:
        args.read_dir = read_dir
    if args.defense == "auto":
        import sys
        from helper.jobs.auto import run_auto
        return run_auto(args, sys.argv[1:] if argv is None else argv)
    from helper.jobs.distill import run
    return run(args)


if __name__ == "__main__":
    main()
