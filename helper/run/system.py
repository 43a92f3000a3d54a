"""Device, precision and seeding, decided once per run and passed to everything else."""
import contextlib
import os
import random
import subprocess
import sys

import numpy as np
import torch

from helper.run.errors import UserError


def select_device(name="auto"):
    """``auto`` is the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: this package runs on cpu or cuda (auto picks one), not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def amp_dtype(device, amp="auto", needs_fp32=False):
    """The autocast dtype, or None for plain fp32: ``auto`` is bf16 on CUDA and fp32 on the CPU, and fp32 everywhere
    for a run that ``needs_fp32`` (ASD: ASL reads convolution outputs far below bf16's rounding)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and not needs_fp32 else "fp32"
    return {"bf16": torch.bfloat16, "fp32": None}[amp]


def autocast(device, dtype):
    """An autocast context for ``dtype``, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def tf32_off(device):
    """Convolutions and matmuls in full fp32 on CUDA inside the block (what an ASD run sets for its whole length);
    the TF32 flags are restored after it. Nothing to do on the CPU."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def use_compile(device, choice="auto"):
    """Whether the losses are fused with ``torch.compile``: ``auto`` is on for CUDA and off on the CPU
    (where compiling costs seconds at start, needs a C++ compiler, and was no clear gain in bench.py)."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, not {choice!r}")
    return device.type == "cuda" if choice == "auto" else choice == "on"


class CompiledOrEager:
    """``torch.compile(fn)``, falling back to ``fn`` itself for good, with one warning line, the first time
    compiling fails (no C++ compiler, no Triton). Meant for pure functions: the failed call is simply rerun."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # compile errors surface at the first call
                reason = (str(e).strip().splitlines() or [""])[0][:200]
                print(f"warning: torch.compile of {self.fn.__name__} failed ({type(e).__name__}: {reason}); "
                      f"running it uncompiled", file=sys.stderr)
                self.compiled = None
        return self.fn(*args, **kwargs)


def memory_format(device):
    """channels_last on every device: cuDNN's convolutions run fastest in it, and so do oneDNN's on the CPU
    (measured by bench.py's author on a 2-core Xeon, width-16 ResNet18, batch 128: a KD step 265 ms
    contiguous, 207 ms channels_last)."""
    return torch.channels_last


def eval_batch_size(device, requested=None):
    """``requested``, or the default: 2000 on CUDA (large batches keep the GPU busy), 256 on the CPU (cache-sized)."""
    return requested or (2000 if device.type == "cuda" else 256)


def eval_every(device, requested=1):
    """How often a run evaluates on the test set: ``requested`` epochs, or for ``auto`` the default of the device
    the run is on (decided in the run itself, not by whoever launched it): every epoch on CUDA, where an evaluation
    costs little beside an epoch, every 5th on the CPU (the selected state is evaluated in full at the end anyway)."""
    if requested == "auto":
        return 1 if device.type == "cuda" else 5
    return int(requested)


CUBLAS_WORKSPACE = ":4096:8"  # what deterministic cuBLAS needs (CUDA >= 10.2), set unless the environment has one


def configure(device, seed, deterministic=False, tf32=True):
    """Seed Python, NumPy and torch. On CUDA, by default, let cuDNN pick its fastest kernels (``benchmark``: which
    kernel wins may differ from one process to the next, and so may the last bits of a result); ``deterministic``
    asks for the same kernels and deterministic algorithms every time instead (a resumed run then equals the run
    made straight through on a GPU too), at some speed. Set both ways, so a later run in the same process gets
    its own. ``tf32``: convolutions and matmuls in TF32 on CUDA (10-bit mantissa); off for a run that needs fp32."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # read when cuBLAS starts: before any matmul
    if deterministic or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(deterministic, warn_only=True)  # an op with no deterministic kernel warns
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def setup(args, needs_fp32=False):
    """Run set-up, in one place for every entry point: (device, autocast dtype, memory format), seeded.
    ``needs_fp32`` (``Defense.needs_fp32``): ``--amp auto`` is fp32 and TF32 is off."""
    device = select_device(args.device)
    configure(device, args.seed, getattr(args, "deterministic", False), tf32=not needs_fp32)
    return device, amp_dtype(device, args.amp, needs_fp32), memory_format(device)


def run_environment(device, amp):
    """What every run folder records about where it ran: git revision, torch version, the device and precision
    in use (``--device`` and ``--amp`` keep what was asked for, e.g. ``auto``)."""
    return {"git": git_revision(), "torch": torch.__version__, "device_used": str(device),
            "precision": str(amp).replace("torch.", "") if amp else "fp32",
            "tf32": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None}


def git_revision():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
