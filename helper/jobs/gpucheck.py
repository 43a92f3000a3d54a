"""The GPU check: one prepared command that measures, within a time budget, what the CPU cannot (docs/gpu.md).

    python -m helper.jobs.gpucheck --budget_s 480 --out runs/gpucheck

Steps, in this order; each starts only while the budget left is above its floor, and a step that does not start
is written down as skipped, with why:

1. ``compile``: ``torch.compile`` of the package's compiled losses (``kd_loss``, ASL's ``asl_terms``) against
   their eager numbers, and how long compiling took;
2. ``precision``: ``helper.report.precision``'s cosines of ASL's and KD's gradients to fp64, in fp32, bf16 and,
   on CUDA, fp32 with TF32 (the teacher of ``--read_dir``, else random weights);
3. ``bench``: ``bench.py`` (KD in bf16, ASD in fp32 with TF32 off, the unlearning defenses' steps, evaluation of
   2 x 10,000 images, peak memory);
4. ``resume``: a short ``--deterministic`` run stopped after its first epoch and resumed, against the same run made
   straight through: bit-identical ``results.json`` and ``log.jsonl``, times aside;
5. ``runs_per_gpu``: 1, 2, 4 and 8 concurrent KD processes on the one device, total images/s of each;
6. ``cell``: with the time left, KD, ASD and ibau on the same teacher for the same epochs (Acc, ASR, seconds per
   epoch, peak memory).

Every figure goes to ``gpucheck.json`` and ``gpucheck.md`` in ``--out``, rewritten after each step, so a check
cut short still leaves what it measured. Without CUDA (or with ``--toy``) every step runs at toy sizes on the
CPU: the check itself is known to work before a GPU ever sees it (``tests/jobs/test_gpucheck.py``).
"""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

import torch

from helper.run.errors import UserError, exits_cleanly
from helper.run.runlog import read_jsonl, write_json, write_text

STEPS = ("compile", "precision", "bench", "resume", "runs_per_gpu", "cell")

# sizes per mode; ``floor_s``: the budget a step needs left to start
SIZES = {
    "gpu": dict(width=64, batch=128, bench_steps=20, bench_rounds=2, eval_images=10000, precision_images=128,
                sweep=(1, 2, 4, 8), sweep_s=20.0, cell_epochs=3, defense_size=5000, teacher_epochs=2,
                synthetic_train=10000, synthetic_test=2000, resume_epochs=2, resume_images=2000,
                floor_s=dict(compile=60, precision=30, bench=90, resume=40, runs_per_gpu=120, cell=60)),
    "toy": dict(width=4, batch=16, bench_steps=2, bench_rounds=1, eval_images=32, precision_images=8,
                sweep=(1, 2), sweep_s=1.0, cell_epochs=1, defense_size=64, teacher_epochs=1,
                synthetic_train=256, synthetic_test=64, resume_epochs=2, resume_images=64,
                floor_s=dict(compile=1, precision=1, bench=1, resume=1, runs_per_gpu=1, cell=1)),
}


class Check:
    """The state of one check: its device, sizes, budget and report."""

    def __init__(self, args):
        from helper.run.system import select_device
        self.args, self.device = args, select_device(args.device)
        self.mode = "toy" if args.toy or self.device.type != "cuda" else "gpu"
        self.size = SIZES[self.mode]
        self.start, self.deadline = time.time(), time.time() + args.budget_s
        self.out = args.out
        self.teacher_dir = args.read_dir
        name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                else f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
        self.report = {"device": name, "torch": torch.__version__, "mode": self.mode, "budget_s": args.budget_s,
                       "steps": {}}

    def left(self):
        return self.deadline - time.time()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def data_flags(self):
        """The Data flags of every run the check makes: ``--dataset``/``--finetunedata`` as given, synthetic sizes."""
        s = self.size
        return ["--dataset", self.args.dataset, "--finetunedata", self.args.finetunedata, "--synthetic_train",
                str(s["synthetic_train"]), "--synthetic_test", str(s["synthetic_test"]), "--device", str(self.device)]

    def teacher(self):
        """``--read_dir``, else a short ADBA attack on the data flags' task, made once (its seconds are reported)."""
        if self.teacher_dir is None:
            import adba
            folder = os.path.join(self.out, "teacher")
            t0 = time.time()
            adba.main(["--width", str(self.size["width"]), "--epochs", str(self.size["teacher_epochs"]),
                       "--miu", "0.001", "--trigger_lr", "0.1", "--batch_size", str(self.size["batch"]), "--no_progress",
                       "--output_dir", folder, "--dataset", self.args.dataset, "--synthetic_train",
                       str(self.size["synthetic_train"]), "--synthetic_test", str(self.size["synthetic_test"]),
                       "--device", str(self.device)])
            self.teacher_dir = folder
            made = _read_json(os.path.join(folder, "results.json"))
            self.report["teacher"] = {"made_by": "adba.py", "seconds": round(time.time() - t0, 1),
                                      **{k: made[k] for k in ("acc", "asr_nontarget", "psnr") if k in made}}
        return self.teacher_dir

    def write(self):
        os.makedirs(self.out, exist_ok=True)
        self.report["elapsed_s"] = round(time.time() - self.start, 1)
        write_json(os.path.join(self.out, "gpucheck.json"), self.report)
        write_text(os.path.join(self.out, "gpucheck.md"), markdown(self.report))


# ---------------------------------------------------------------- the steps

def _max_diff(a, b):
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def step_compile(c):
    """Each compiled loss against its eager self on the same inputs: max |difference| and compile seconds."""
    from helper.train.losses import asl_terms, kd_loss
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(c.size["batch"], 10, generator=g), torch.randn(c.size["batch"], 10, generator=g)
    fs, ft = torch.randn(c.size["batch"], c.size["width"], 8, 8, generator=g), torch.randn(
        c.size["batch"], c.size["width"], 8, 8, generator=g)
    out = {}
    for name, fn, inputs in (("kd_loss", kd_loss, (s, t, 40.0, "mean")), ("asl_terms", asl_terms, (fs, ft, 0.1))):
        inputs = tuple(x.to(c.device) if torch.is_tensor(x) else x for x in inputs)
        eager = fn(*inputs)
        t0 = time.time()
        compiled = torch.compile(fn, backend=c.args.compile_backend)(*inputs)
        c.sync()
        out[name] = {"max_abs_diff": _max_diff(eager, compiled), "compile_s": round(time.time() - t0, 2)}
    out["backend"] = c.args.compile_backend
    return out


def step_precision(c):
    """Cosines to fp64 of ASL's and KD's weight gradients, student 2% and 10% away (``helper.report.precision``)."""
    from helper.data import images as D
    from helper.data.teacher_dir import read_teacher
    from helper.report.precision import asl_weight_grad, cosines, kd_weight_grad
    from models import resnet18
    if c.args.read_dir:
        teacher, note = read_teacher(c.args.read_dir)[0], c.args.read_dir
    else:
        torch.manual_seed(0)
        teacher, note = resnet18(10, c.size["width"]), f"random weights, width {c.size['width']}"
    n = c.size["precision_images"]
    x = D.to_float(D.load_splits(c.args.finetunedata, role="ood", synthetic_train=n, synthetic_test=1)[0].x[:n])
    teacher, x = teacher.to(c.device), x.to(c.device)
    out = {"teacher": note, "images": n}
    for noise in (0.02, 0.1):
        for name, grad in (("asl", asl_weight_grad), ("kd", kd_weight_grad)):
            out[f"{name}_{noise:g}"] = {k: round(v, 4) for k, v in cosines(teacher, x, noise, 0, grad).items()}
    return out


def step_bench(c):
    """bench.py at the mode's sizes; its JSON figures and the peak memory of each row."""
    from helper.jobs import bench
    s = c.size
    path = os.path.join(c.out, "bench.json")
    argv = ["--width", str(s["width"]), "--batch_size", str(s["batch"]), "--steps", str(s["bench_steps"]),
            "--warmup", "1" if c.mode == "toy" else "3", "--rounds", str(s["bench_rounds"]),
            "--eval_images", str(s["eval_images"]), "--device", str(c.device), "--json", path]
    if c.mode == "toy":
        argv += ["--no_reference", "--defenses", "ibau", "--compile", "off"]
    result = bench.main(argv)
    return {k: result.get(k) for k in ("width", "batch_size", "kd_img_s", "asd_img_s", "asd_over_kd", "eval_img_s",
                                        "reference_img_s", "defenses", "peak_gib")}


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _rows_and_results(folder):
    """A run's log rows and results.json without their times (``time_s``, ``train_time_s``)."""
    rows = [{k: v for k, v in r.items() if k != "time_s"} for r in read_jsonl(os.path.join(folder, "log.jsonl"))]
    results = _read_json(os.path.join(folder, "results.json"))
    return rows, {k: v for k, v in results.items() if k != "train_time_s"}


def step_resume(c):
    """A --deterministic KD run stopped during its second epoch and resumed, against the run straight through."""
    import distri
    from helper.run import interrupt
    s, teacher = c.size, c.teacher()
    flags = ["--read_dir", teacher, *c.data_flags(), "--ratio_type", "fix", "--epoch", str(s["resume_epochs"]),
             "--defense_size", str(s["resume_images"]), "--batch_size", str(s["batch"]), "--deterministic",
             "--no_progress", "--select_from", "0"]
    straight, stopped = os.path.join(c.out, "resume", "straight"), os.path.join(c.out, "resume", "stopped")
    distri.main(flags + ["--output_dir", straight])
    steps_per_epoch = -(-s["resume_images"] // s["batch"])
    real, calls = interrupt.check, {"n": 0}

    def check():  # as if Ctrl-C came during the second epoch
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 1:
            interrupt.request(signal.SIGINT)
        real()
    interrupt.check = check
    try:
        distri.main(flags + ["--output_dir", stopped])
    except SystemExit as e:
        if e.code != 128 + signal.SIGINT:
            raise
    finally:
        interrupt.check = real
    distri.main(flags + ["--output_dir", stopped, "--resume"])
    a, b = _rows_and_results(straight), _rows_and_results(stopped)
    differ = sorted(k for k in set(a[1]) | set(b[1]) if a[1].get(k) != b[1].get(k))
    return {"identical_results": not differ, "identical_log": a[0] == b[0], "differing_keys": differ,
            "epochs": s["resume_epochs"], "stopped_at_step": steps_per_epoch + 1}


def step_runs_per_gpu(c):
    """Total KD images/s of k concurrent processes on the one device, for each k of the mode's sweep."""
    s, totals = c.size, {}
    env = {**os.environ, "OMP_NUM_THREADS": "1" if c.mode == "toy" else str(max(1, (os.cpu_count() or 1) // 8))}
    for k in s["sweep"]:
        if c.left() < s["sweep_s"] + 30:
            totals[str(k)] = "skipped: budget"
            continue
        cmd = [sys.executable, "-m", "helper.jobs.gpucheck", "--child_throughput", str(s["width"]), str(s["batch"]),
               str(s["sweep_s"]), "--device", str(c.device)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(k)]
        outs = [p.communicate(timeout=max(c.left(), 60)) for p in procs]
        bad = [err.strip().splitlines()[-1:] for p, (_, err) in zip(procs, outs) if p.returncode]
        if bad:
            raise RuntimeError(f"a throughput child failed: {bad[0]}")
        totals[str(k)] = round(sum(json.loads(o.strip().splitlines()[-1])["img_s"] for o, _ in outs), 1)
    measured = {k: v for k, v in totals.items() if isinstance(v, float)}
    return {"total_img_s": totals, "best": max(measured, key=measured.get) if measured else None,
            "width": s["width"], "batch": s["batch"], "seconds_each": s["sweep_s"]}


def child_throughput(width, batch, seconds, device_name):
    """One process of the sweep: KD steps (the run's precision: bf16 on CUDA) on random images for ``seconds``
    after 3 warm-up steps; prints ``{"img_s": ...}``."""
    from helper.jobs import profile as P
    from helper.run.system import amp_dtype, configure, memory_format, select_device
    device = select_device(device_name)
    configure(device, 0)
    fmt = memory_format(device)
    teacher, student = P.models(width, device, fmt)
    kd = P.make_distiller(teacher, student, amp_dtype(device), False)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    for _ in range(3):
        kd.step(x, *P.KD_WEIGHTS)
    P.sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        kd.step(x, *P.KD_WEIGHTS)
        n += 1
        if n % 10 == 0:
            P.sync(device)
    P.sync(device)
    print(json.dumps({"img_s": n * batch / (time.perf_counter() - t0)}))


def step_cell(c):
    """KD, ASD and ibau on the check's teacher for the same epochs, while the budget lasts."""
    import distri
    s, teacher, out = c.size, c.teacher(), {}
    per_run = None
    for defense in ("kd", "asd", "ibau"):
        if per_run is not None and c.left() < 1.5 * per_run:
            out[defense] = "skipped: budget"
            continue
        if c.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(c.device)
        t0 = time.time()
        r = distri.main(["--read_dir", teacher, *c.data_flags(), "--defense", defense, "--epoch", str(s["cell_epochs"]),
                         "--defense_size", str(s["defense_size"]), "--no_progress", "--select_from", "0",
                         "--output_dir", os.path.join(c.out, "cell", defense)])
        per_run = time.time() - t0
        out[defense] = {"acc": r["acc"], "asr_nontarget": r["asr_nontarget"], "seconds": round(per_run, 1),
                        "s_per_epoch": round(r["train_time_s"] / max(r["epochs_run"], 1), 2),
                        "train_precision": r.get("train_precision"),
                        "peak_gib": (round(torch.cuda.max_memory_allocated(c.device) / 2 ** 30, 2)
                                     if c.device.type == "cuda" else None)}
    out.update(epochs=s["cell_epochs"], defense_images=s["defense_size"], width=s["width"])
    return out


STEP_FNS = {"compile": step_compile, "precision": step_precision, "bench": step_bench, "resume": step_resume,
            "runs_per_gpu": step_runs_per_gpu, "cell": step_cell}


def run_steps(c, steps, out=print):
    """Run ``steps`` in order within the budget; each one's figures, or its failure, or why it was skipped."""
    for name in steps:
        floor = c.size["floor_s"][name]
        if c.left() < floor:
            c.report["steps"][name] = {"status": "skipped", "why": f"{c.left():.0f} s of the budget left, "
                                                                  f"{floor} s needed to start"}
        else:
            out(f"gpucheck: {name} ({c.left():.0f} s of the budget left)", flush=True)
            t0 = time.time()
            try:
                figures = STEP_FNS[name](c)
                c.report["steps"][name] = {"status": "ok", "seconds": round(time.time() - t0, 1), **figures}
            except (Exception, SystemExit) as e:  # a failed step is a finding; the next steps still run
                c.report["steps"][name] = {"status": "failed", "seconds": round(time.time() - t0, 1),
                                           "why": f"{type(e).__name__}: {str(e).strip()[:300]}"}
        c.write()
    return c.report


def markdown(report):
    lines = [f"# GPU check: {report['device']}", "",
             f"torch {report['torch']}, mode {report['mode']}, budget {report['budget_s']} s, "
             f"elapsed {report.get('elapsed_s')} s", ""]
    if "teacher" in report:
        lines += [f"teacher: {json.dumps(report['teacher'])}", ""]
    for name in STEPS:
        step = report["steps"].get(name)
        if step is None:
            continue
        figures = {k: v for k, v in step.items() if k not in ("status", "seconds", "why")}
        head = f"## {name}: {step['status']}" + (f" ({step['seconds']} s)" if "seconds" in step else "")
        lines += [head, ""] + ([f"why: {step['why']}", ""] if "why" in step else [])
        lines += [f"- {k}: {json.dumps(v, default=str)}" for k, v in figures.items()] + [""]
    return "\n".join(lines)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget_s", type=float, default=480, help="seconds the whole check may take")
    p.add_argument("--out", default="runs/gpucheck", help="folder of gpucheck.json, gpucheck.md and the runs")
    p.add_argument("--toy", action="store_true", help="toy sizes even on a GPU (the default without CUDA)")
    p.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS), help="these steps, in the check's order")
    p.add_argument("--device", default="auto")
    p.add_argument("--read_dir", default=None,
                   help="a teacher folder for precision, resume and cell (default: a short ADBA attack on --dataset)")
    p.add_argument("--dataset", default="synthetic", help="the teacher's task (synthetic, or an .npz)")
    p.add_argument("--finetunedata", default="synthetic", help="the defense images (synthetic, or an .npz)")
    p.add_argument("--compile_backend", default="inductor",
                   help="torch.compile's backend for the compile step (inductor: what the package uses)")
    p.add_argument("--child_throughput", nargs=3, default=None, metavar=("WIDTH", "BATCH", "SECONDS"),
                   help=argparse.SUPPRESS)
    return p


@exits_cleanly
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.child_throughput:
        w, b, sec = args.child_throughput
        return child_throughput(int(w), int(b), float(sec), args.device)
    if not args.budget_s > 0:
        raise UserError(f"--budget_s must be positive, not {args.budget_s}")
    # the resume step runs --deterministic in this process after others used cuBLAS: its workspace setting must be in
    # place before the first matmul (helper.run.system.configure sets it only where no cuBLAS ran yet)
    from helper.run.system import CUBLAS_WORKSPACE
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    c = Check(args)
    print(f"gpucheck: {c.report['device']}, {c.mode} sizes, budget {args.budget_s:.0f} s -> {args.out}", flush=True)
    report = run_steps(c, [s for s in STEPS if s in args.only])
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
