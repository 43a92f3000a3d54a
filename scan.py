"""Is this teacher backdoored, towards which class, and what does its trigger look like? (no trigger needed)

    python scan.py --read_dir DIR                     # CIFAR-10 teacher, CIFAR-100 defense images
    python scan.py --read_dir DIR --families mask     # Neural Cleanse's family only

Writes scan.json (verdict, target, per family: size per class, anomaly index, flagged classes) and scan.png.
The folder's pattern.pt / mask.pt are read only after the verdict, for evaluation (helper/jobs/scan.py).
"""
from helper.jobs.scan import run_scan, scan_parser
from helper.run.errors import exits_cleanly


@exits_cleanly
def main(argv=None):
    return run_scan(scan_parser().parse_args(argv))


if __name__ == "__main__":
    main()
