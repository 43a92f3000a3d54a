"""Speed of the ASD training loop, against plain KD and against the same step written the public code's way.

    python bench.py                                   # width 64 on a GPU, 16 on a CPU
    python bench.py --device cpu --width 16 --steps 20 --json bench.json
    python bench.py --profile                         # + seconds per phase of one epoch

Measured in one process, on the same synthetic images and the same random-weight ResNet18:
(a) our ASD step (KD + ASL, both weights non-zero), (b) our plain-KD step, both through
an epoch of the engine (augmentation on the device, one host sync per epoch); (c) the ASD step the public
code's way (``helper/jobs/reference.py``: DataLoader with per-image PIL transforms and 2 workers, fp32, hooks
on every block, masked ASL, ``.item()`` every step); (d) ``evaluate`` on a clean and a triggered test set; (e) the step of each unlearning defense (``--defenses``:
ibau, sau, nc) with its defaults at the same batch size, as a multiple of a KD step.
(a) and (b) alternate over ``--rounds`` and the best round counts, so that a burst of load from another
process on the machine does not land on one of them only.
"""
from helper.jobs.bench import get_args_parser, main  # noqa: F401  (the parser, for --help and the tests)

if __name__ == "__main__":
    main()
