"""``--resume``: every run keeps ``last.pt``, the state after its last completed epoch, and continues from it.

``last.pt`` holds only tensors and plain values (read with ``weights_only=True``): the models and optimizers
of every stage, the learning-rate drop, the RNG states of every generator the run draws from, the next
(stage, epoch), the selection so far and the number of log lines written. A resumed run truncates
``log.jsonl`` to those lines, so the log has one line per epoch, none repeated, and on the same machine
it ends with the same ``results.json`` and ``log.jsonl`` (times aside) as the run made straight through
(on a GPU with ``--deterministic``: without it cuDNN may pick other kernels after the restart).

A run resumes on the device type it started on: its batches are drawn from a generator on that device (a CPU
generator and a CUDA one give other sequences from one seed, and their states do not convert), so a run
started on a GPU and resumed on the CPU would be neither run. ``--resume`` on another device type is refused
in one line naming both, before the folder is touched.
"""
import json
import os
import sys

import torch

from helper.run.checkpoint import safe_load
from helper.run.errors import UserError
from helper.run.runlog import atomic_torch_save, open_run, read_jsonl, write_json, write_jsonl

LAST = "last.pt"
NOT_COMPARED = ("resume", "no_progress", "output_dir", "checkpoint_every")  # may differ between start and resume


def differing_flags(saved, args, defaults=None, resolved=None):
    """``--flag saved -> now`` for every argument whose value differs from the run's args.json. A flag the
    run's args.json lacks (added to the package after the run started) counts as the same when its value now
    is its default in ``defaults``: the run ran without it, i.e. as with its default. ``resolved`` maps a flag
    given as ``auto`` now to what ``auto`` amounts to in this run (``{"eval_every": 5}`` on the CPU): a run
    started with that number counts as the same (a grid started before reproduce.py passed ``auto``)."""
    now = json.loads(json.dumps(vars(args), default=str))
    defaults = json.loads(json.dumps(defaults or {}, default=str))
    resolved = resolved or {}

    def same(k, v):
        if saved.get(k) == v or (k not in saved and k in defaults and defaults[k] == v):
            return True
        return v == "auto" and k in resolved and saved.get(k) == resolved[k]
    return [f"--{k} {saved.get(k)!r} -> {v!r}" for k, v in sorted(now.items())
            if k not in NOT_COMPARED and not same(k, v)]


class Finished(Exception):
    """``--resume`` of a run that already finished: its results."""

    def __init__(self, results):
        super().__init__("finished")
        self.results = results


def open_or_resume(args, name, record, out=print, defaults=None, resolved=None, device=None):
    """A new run folder (``open_run``), or with ``--resume`` the existing one: ``(folder, last.pt or None)``.

    Refused: ``--resume`` without ``--output_dir``, a folder that is no run, arguments that differ from the
    ones the run was started with (the flags named; ``defaults`` excuses flags newer than the run, ``resolved``
    an ``auto`` that amounts to the run's number, see ``differing_flags``), and with ``device`` (the run's
    ``torch.device``) a last.pt saved on another device type (``check_rng_device``), before anything in the
    folder changes. A finished run raises ``Finished``.
    """
    if not getattr(args, "resume", False):  # a run without --resume (the scan has none): a new folder
        return open_run(args.output_dir, name, record, out), None
    folder = args.output_dir
    if folder is None:
        raise UserError("--resume needs --output_dir: the folder of the run to continue")
    args_path = os.path.join(folder, "args.json")
    if not os.path.isfile(args_path):
        raise UserError(f"--resume: {folder} holds no args.json, so it is no run folder to continue")
    with open(args_path) as f:
        saved = json.load(f)
    diff = differing_flags(saved, args, defaults, resolved)
    if diff:
        raise UserError(f"--resume: the run in {folder} was started with other arguments: {'; '.join(diff)}")
    results_path = os.path.join(folder, "results.json")
    results = None
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
        if not results.get("stopped"):
            raise Finished(results)
    last_path = os.path.join(folder, LAST)
    last = safe_load(last_path, "last.pt") if os.path.isfile(last_path) else None
    if last is not None and device is not None and "rng" in last:
        check_rng_device(last["rng"], torch.device(device), folder)
    if results is not None:
        os.remove(results_path)  # a stopped run's results are rewritten when it ends
    if last is None:  # nothing was computed yet: the run starts afresh here, so args.json says where (device_used, ...)
        write_json(args_path, record)
    log_path = os.path.join(folder, "log.jsonl")
    rows = read_jsonl(log_path, complete_only=True) if os.path.isfile(log_path) else []
    write_jsonl(log_path, rows[:last["n_rows"]] if last else [])
    where = (f"stage {last['stage']}, " if "stage" in last else "") + f"epoch {last['epoch']}" if last else None
    out(f"run folder: {folder} (resumed " + (f"at {where})" if where else "from the start: no epoch had completed)"))
    return folder, last


def save_last(folder, payload):
    atomic_torch_save(payload, os.path.join(folder, LAST))


def rng_states(generator, device=None):
    """The RNG states a run draws from, for last.pt: its ``generator`` (on the run's ``device``, by default the
    generator's own), torch's CPU generator and, on CUDA, the default generator of the run's own GPU only (asking
    for every GPU's would open a CUDA context on each visible one, every epoch). ``device`` names the type."""
    device = torch.device(device if device is not None else generator.device)
    states = {"device": device.type, "generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_device"] = torch.cuda.get_rng_state(device)
    return states


def _saved_device_type(states):
    """The device type the states were saved on: recorded since last.pt has ``device``; before, told by the size
    of the generator's state (a CPU generator's Mersenne Twister state is large, a CUDA one's Philox state is
    16 bytes)."""
    if "device" in states:
        return states["device"]
    return "cpu" if states["generator"].numel() == torch.Generator().get_state().numel() else "cuda"


def check_rng_device(states, device, folder=None):
    """A UserError, in one line naming both, when ``states`` were saved on another device type than ``device``."""
    saved = _saved_device_type(states)
    if saved != device.type:
        where = f"the run in {folder}" if folder else "the run"
        how = ("on a machine with a CUDA GPU" if saved == "cuda" else
               "on the CPU (with --device auto: CUDA_VISIBLE_DEVICES= hides the GPUs)")
        raise UserError(f"--resume: {where} started on {saved} and would continue on {device.type}; a run resumes "
                        f"on the device type it started on (its batches come from a {saved} random generator, which "
                        f"a {device.type} one cannot continue): resume it {how}")


def set_rng_states(generator, states, device=None):
    """Restore ``rng_states``' states (a last.pt of another device type is a UserError, ``check_rng_device``).
    A last.pt from before the run's device was saved holds every GPU's state as ``cuda``: the run's GPU's is taken."""
    device = torch.device(device if device is not None else generator.device)
    check_rng_device(states, device)
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if "cuda_device" in states:
            torch.cuda.set_rng_state(states["cuda_device"], device)
        elif index < len(states.get("cuda", [])):
            torch.cuda.set_rng_state(states["cuda"][index], device)


def resume_hint(folder):
    """The command that continues a stopped run: this one, with ``--output_dir folder --resume``."""
    argv = list(sys.argv)
    if "--output_dir" not in argv:
        argv += ["--output_dir", folder]
    if "--resume" not in argv:
        argv.append("--resume")
    return "python " + " ".join(argv)
