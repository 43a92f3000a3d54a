"""The paper's table in one command: a grid of defenses x defense-set sizes x seeds on one teacher.

    python reproduce.py --read_dir DIR --preset paper            # KD, ASD, BCU at 5,000 / 50,000, ASD at 60,000; 7 seeds
    python reproduce.py --read_dir DIR --preset cpu --dataset ../shared/data/cifar10.npz \\
        --finetunedata ../shared/data/cifar100.npz               # a grid a 2-core CPU finishes in about 2 hours
    python reproduce.py --read_dir DIR --defenses asd nad --sizes 5000 --seeds 0 1 2 --epochs 50
    python reproduce.py ... --launcher slurm --partition gpu     # one Slurm job array through submitit
    python reproduce.py --attacks runs/adba-w8 badnets blended none --attack_flags='--width 8 --epochs 20' ...
                                                                 # the grid on each of these teachers, and a summary

Every run is an ordinary distri.py run folder under --output_dir; any flag reproduce.py does not know is
passed to every run. Run the same command again and finished runs are skipped, interrupted ones resumed.
The table (table.md, table_arms.md: one row per arm with its cut and loss against KD; table.csv, table.json)
and tradeoff.png are written when the runs are done. An arm is a defense with flags of its own (``--arm``,
or the ``study`` preset's variants of ASD); ``--only`` picks cells or arms by label.

``--attacks`` instead of ``--read_dir`` adds an axis over teachers: each SPEC is a teacher folder or an attack
name, which ``adba.py --attack NAME`` trains first into OUT/teachers/NAME (skipped once finished, resumed when
interrupted). Each teacher's grid and tables go to OUT/LABEL/; summary.md and summary.json put them side by side.
A clean teacher (``none``) is measured with the trigger of the first teacher in --attacks that has one.
"""
import sys

from helper.jobs.reproduce import get_parser, main  # noqa: F401  (the parser, for --help and the tests)

if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
