"""The grid behind reproduce.py: defenses x defense-set sizes x seeds, each an ordinary ``distri.py`` run.

A run is a command line and a folder. Running the grid again skips finished runs (a results.json without
``stopped``), continues interrupted ones with ``--resume``, and starts the rest; runs go to a local pool
(``--jobs``, spread over the visible GPUs, ``--runs_per_gpu`` per GPU, one CPU thread each on a CPU) or to
Slurm as one job array through submitit. A teacher a grid needs first (``reproduce.py --attacks NAME``) is a
``TeacherRun``: an ordinary ``adba.py --attack NAME`` run folder, skipped and resumed the same way.
"""
import json
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# cells: (defense, defense images); "epochs": None keeps each defense's own default (300 for KD and ASD)
PRESETS = {
    "paper": {"cells": [("kd", 5000), ("asd", 5000), ("bcu", 5000), ("kd", 50000), ("asd", 50000), ("bcu", 50000),
                        ("asd", 60000)], "seeds": 7, "epochs": None, "flags": []},
    # a 2-core CPU, one thread per run, two at a time, a width-8 teacher: ~10 s per epoch on 5,000 images when
    # every 5th epoch is evaluated; 9 runs of 60 epochs (selected from epoch 50, as the paper) in about an hour
    "cpu": {"cells": [("kd", 5000), ("asd", 5000), ("bcu", 5000)], "seeds": 3, "epochs": 60,
            "flags": ["--select_from", "50"]},
    # "Making ASD keep its accuracy" (docs/asd-study.md): the cpu preset's cells plus variants of ASD, each an arm
    "study": {"cells": [("kd", 5000), ("asd", 5000), ("bcu", 5000)] + [("asd", 5000, label, flags) for label, flags in (
        ("asd-first", ["--asl_samples", "first"]),          # the public code's ASL: sample 0 of each batch
        ("asd-bn", ["--hook_layers", "layer*.*.bn1"]),       # ASL after batch-norm: no sign-flip symmetry
        ("asd-dormant", ["--shift", "dormant"]),              # only the 10% least active channels per layer
        ("asd-keepkd", ["--shift_kd", "0.9"]),                # KD weight 0.9 kept during the shift
        ("asd-freezebn", ["--freeze_bn", "shift"]),           # running statistics frozen during the shift
        ("asd-clip", ["--clip_grad", "5"]),                   # each step's gradient clipped to norm 5
        ("asd-local", ["--shift_grad", "local"]),             # ASL moves only the hooked convolutions' weights
        ("asd-local-dormant", ["--shift_grad", "local", "--shift", "dormant"]),  # ... of the 10% least active
        ("asd-local-half", ["--shift_grad", "local", "--shift", "dormant", "--shift_fraction", "0.5"]),  # ... 50%
    )] + [("kd", 5000, "kd-scratch", ["--using_checkpoint", "0"])],  # KD into a freshly initialised student
        "seeds": 3, "epochs": 60, "flags": ["--select_from", "50"]},
    "smoke": {"cells": [("kd", 64), ("asd", 64)], "seeds": 2, "epochs": 2,
              "flags": ["--dataset", "synthetic", "--finetunedata", "synthetic", "--synthetic_train", "128",
                        "--synthetic_test", "64", "--batch_size", "32", "--device", "cpu"]},
}


def arm(cell):
    """A grid cell as ``(label, defense, defense images, flags)``: ``(defense, n)`` is the defense as it is;
    ``(defense, n, label, flags)`` an arm, the defense with flags of its own (a variant of a study)."""
    if len(cell) == 2:
        return cell[0], cell[0], cell[1], ()
    defense, n, label, flags = cell
    return label, defense, n, tuple(flags)


def folder_state(folder):
    """A run folder's state: 'finished' (a readable results.json without ``stopped``), 'interrupted' (an
    args.json otherwise: a folder to ``--resume``) or 'new'."""
    results = os.path.join(folder, "results.json")
    if os.path.isfile(results):
        try:
            with open(results) as f:
                if not json.load(f).get("stopped"):
                    return "finished"
        except (ValueError, AttributeError):
            pass
    return "interrupted" if os.path.isfile(os.path.join(folder, "args.json")) else "new"


class FolderRun:
    """A run of one of the package's scripts into ``self.folder`` (subclasses set ``script`` and
    ``script_argv``): its state, and its command, continued with ``--resume`` once it was interrupted."""

    def state(self):
        """'finished', 'interrupted' (a folder to --resume) or 'new'."""
        return folder_state(self.folder)

    def command(self):
        return [sys.executable, os.path.join(ROOT, self.script), *self.script_argv()] + (
            ["--resume"] if self.state() == "interrupted" else [])


@dataclass
class Run(FolderRun):
    defense: str
    n_defense: int
    seed: int
    folder: str
    argv: list
    label: str = None  # the arm's name; the defense's when None
    group: str = None  # the teacher's label in a grid over attacks (reproduce.py --attacks); None for one teacher
    log_dir: str = None  # where its log goes; None: OUT/logs

    @property
    def cell(self):
        return f"{self.label or self.defense}-n{self.n_defense}"

    @property
    def name(self):
        """How the run is named in progress lines and errors: ``kd-n5000 seed 0`` (``badnets/kd-n5000 seed 0``)."""
        return (f"{self.group}/" if self.group else "") + f"{self.cell} seed {self.seed}"

    @property
    def log_name(self):
        return f"{self.cell}-seed{self.seed}.log"

    script = "distri.py"

    def script_argv(self):
        return self.argv


@dataclass
class TeacherRun(FolderRun):
    """``adba.py --attack ATTACK ARGV`` into ``folder``: a teacher a grid over attacks trains before its runs."""
    attack: str
    folder: str
    argv: list  # adba.py's flags after --attack (--output_dir included)
    log_dir: str = None

    @property
    def name(self):
        return f"teacher {self.attack}"

    @property
    def log_name(self):
        return f"teacher-{self.attack}.log"

    script = "adba.py"

    def script_argv(self):
        return ["--attack", self.attack, *self.argv]


def size_flags(n_defense):
    """60,000 images is CIFAR-100 train + test (``--finetune_extend``); any other size is drawn from train."""
    return ["--finetune_extend", "--defense_size", str(n_defense)] if n_defense > 50000 else ["--defense_size", str(n_defense)]


def build_grid(out_dir, cells, seeds, epochs=None, flags=(), group=None):
    """One ``Run`` per cell (``arm``) and seed, in ``out_dir/LABEL-nN/seedS``; an arm's flags come last. With a
    ``group`` (a teacher's label in a grid over attacks) the runs are named after it and log to ``out_dir/logs``."""
    runs = []
    for cell in cells:
        label, defense, n, own = arm(cell)
        for seed in seeds:
            folder = os.path.join(out_dir, f"{label}-n{n}", f"seed{seed}")
            argv = ["--defense", defense, *size_flags(n), "--seed", str(seed), "--output_dir", folder,
                    "--no_progress", *(["--epoch", str(epochs)] if epochs else []), *flags, *own]
            runs.append(Run(defense, n, seed, folder, argv, label, group,
                            os.path.join(out_dir, "logs") if group else None))
    return runs


def run_one(command, log_path, env=None):
    """Run one command with its output in ``log_path``; returns (exit code, seconds)."""
    start = time.time()
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    return code, time.time() - start


def log_path(out_dir, run):
    """A run's log: in its own ``log_dir`` when it has one, else in ``out_dir/logs``."""
    return os.path.join(run.log_dir or os.path.join(out_dir, "logs"), run.log_name)


def run_line(run, code, seconds):
    """One line per finished run: its name (cell and seed, or the teacher), Acc, ASR where the run has one (a
    clean teacher has none), time; or why it failed."""
    if code != 0:
        return f"{run.name}: FAILED (exit {code}, {seconds:.0f} s); see the log"
    with open(os.path.join(run.folder, "results.json")) as f:
        r = json.load(f)
    asr = f"  asr {r['asr']:.4f}" if isinstance(r.get("asr"), (int, float)) else ""
    return f"{run.name}: acc {r['acc']:.4f}{asr}  ({seconds:.0f} s)"


def visible_gpus(env=None, count=None):
    """The GPUs this process may use, as the ids a child's ``CUDA_VISIBLE_DEVICES`` takes, in torch's order:
    the parent's own ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs, ``GPU-...`` / ``MIG-...``; like CUDA, the list
    ends at its first entry that is neither), or when it is unset ``0 .. count - 1``. Slot i is ``cuda:i`` here,
    and the i-th of these ids in a child: a child told ``0`` under a parent given ``2,3`` would run on GPU 0,
    outside the parent's allocation."""
    env = os.environ if env is None else env
    text = env.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return [str(i) for i in range(count or 0)]
    ids = []
    for entry in text.split(","):
        entry = entry.strip()
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        ids.append(entry)
    return ids[:count] if count is not None else ids


def cpu_cores():
    """The CPU cores this process may run on (its affinity: a Slurm allocation's, not the whole node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_env(gpu, threads=1, parent=None):
    """A child's environment: the parent's (``parent``, default ``os.environ``), on GPU id ``gpu`` (a string for
    ``CUDA_VISIBLE_DEVICES``; None: the CPU) with ``OMP_NUM_THREADS`` = ``threads`` whatever the parent's was (a
    parent's value is its own share of the cores, not each of ``--jobs`` children's)."""
    env = {**(os.environ if parent is None else parent), "OMP_NUM_THREADS": str(threads)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def child_envs(jobs, gpus=0, runs_per_gpu=1, parent=None, cores=None):
    """The environments of ``jobs`` concurrent children, one per slot: on GPUs ``runs_per_gpu`` consecutive slots
    per GPU, GPU i being the i-th of the parent's visible ones (``visible_gpus``), each child with
    max(1, cores // jobs) CPU threads; on the CPU (``gpus`` 0) one thread each."""
    parent = os.environ if parent is None else parent
    if not gpus:
        return [local_env(None, 1, parent) for _ in range(jobs)]
    ids = visible_gpus(parent, gpus)
    ids += [str(i) for i in range(len(ids), gpus)]  # a list shorter than torch's count: never seen, but no IndexError
    threads = max(1, (cores or cpu_cores()) // max(jobs, 1))
    return [local_env(ids[i // max(runs_per_gpu, 1) % gpus], threads, parent) for i in range(jobs)]


def run_local(runs, out_dir, jobs, gpus=0, runs_per_gpu=1, out=tqdm.write, desc="grid"):
    """Run ``runs`` ``jobs`` at a time; on GPUs each takes a slot (``runs_per_gpu`` per GPU, ``child_envs``).
    Returns failures."""
    slots = queue.Queue()
    for env in child_envs(jobs, gpus, runs_per_gpu):
        slots.put(env)
    failures = []

    def work(run):
        env = slots.get()
        try:
            return run, *run_one(run.command(), log_path(out_dir, run), env)
        finally:
            slots.put(env)

    with ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(total=len(runs), desc=desc, file=sys.stdout) as bar:
        for future in as_completed([pool.submit(work, r) for r in runs]):
            run, code, seconds = future.result()
            out(run_line(run, code, seconds))
            if code != 0:
                failures.append(run)
            bar.update()
    return failures


def _submitit_job(command, log):
    return run_one(command, log)


def run_submitit(runs, out_dir, cluster=None, partition=None, timeout_min=600, gpus_per_job=1, out=print):
    """The runs as one job array through submitit: Slurm (``cluster=None`` picks it), or ``"local"`` (tests)."""
    import submitit
    executor = submitit.AutoExecutor(folder=os.path.join(out_dir, "submitit"), cluster=cluster)
    params = {"timeout_min": timeout_min, "name": "asd-grid"}
    if executor.cluster == "slurm":
        params.update(slurm_partition=partition, gpus_per_node=gpus_per_job, tasks_per_node=1, cpus_per_task=4)
    executor.update_parameters(**params)
    jobs = executor.map_array(_submitit_job, [r.command() for r in runs], [log_path(out_dir, r) for r in runs])
    out(f"submitted {len(jobs)} runs as a {executor.cluster} job array ({jobs[0].job_id.split('_')[0]})")
    failures = []
    for run, job in zip(runs, jobs):
        code, seconds = job.result()
        out(run_line(run, code, seconds))
        if code != 0:
            failures.append(run)
    return failures
