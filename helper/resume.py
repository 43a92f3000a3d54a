"""``--resume``: every run keeps ``last.pt``, the state after its last completed epoch, and continues from it.

``last.pt`` holds only tensors and plain values (read with ``weights_only=True``): the models and optimizers
of every stage, the learning-rate drop, the RNG states of every generator the run draws from, the next
(stage, epoch), the selection so far and the number of log lines written. A resumed run truncates
``log.jsonl`` to those lines, so the log has one line per epoch, none repeated, and on the same machine
it ends with the same ``results.json`` and ``log.jsonl`` (times aside) as the run made straight through.
"""
import json
import os
import sys

import torch

from helper.checkpoint import safe_load
from helper.errors import UserError
from helper.runlog import atomic_torch_save, open_run, read_jsonl, write_jsonl

LAST = "last.pt"
NOT_COMPARED = ("resume", "no_progress", "output_dir", "checkpoint_every")  # may differ between start and resume


def differing_flags(saved, args, defaults=None):
    """``--flag saved -> now`` for every argument whose value differs from the run's args.json. A flag the
    run's args.json lacks (added to the package after the run started) counts as the same when its value now
    is its default in ``defaults``: the run ran without it, i.e. as with its default."""
    now = json.loads(json.dumps(vars(args), default=str))
    defaults = json.loads(json.dumps(defaults or {}, default=str))
    return [f"--{k} {saved.get(k)!r} -> {v!r}" for k, v in sorted(now.items())
            if k not in NOT_COMPARED and saved.get(k) != v and not (k not in saved and k in defaults and defaults[k] == v)]


class Finished(Exception):
    """``--resume`` of a run that already finished: its results."""

    def __init__(self, results):
        super().__init__("finished")
        self.results = results


def open_or_resume(args, name, record, out=print, defaults=None):
    """A new run folder (``open_run``), or with ``--resume`` the existing one: ``(folder, last.pt or None)``.

    Refused: ``--resume`` without ``--output_dir``, a folder that is no run, arguments that differ from the
    ones the run was started with (the flags named; ``defaults`` excuses flags newer than the run, see
    ``differing_flags``). A finished run raises ``Finished``.
    """
    if not args.resume:
        return open_run(args.output_dir, name, record, out), None
    folder = args.output_dir
    if folder is None:
        raise UserError("--resume needs --output_dir: the folder of the run to continue")
    args_path = os.path.join(folder, "args.json")
    if not os.path.isfile(args_path):
        raise UserError(f"--resume: {folder} holds no args.json, so it is no run folder to continue")
    with open(args_path) as f:
        saved = json.load(f)
    diff = differing_flags(saved, args, defaults)
    if diff:
        raise UserError(f"--resume: the run in {folder} was started with other arguments: {'; '.join(diff)}")
    results_path = os.path.join(folder, "results.json")
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
        if not results.get("stopped"):
            raise Finished(results)
        os.remove(results_path)  # a stopped run's results are rewritten when it ends
    last_path = os.path.join(folder, LAST)
    last = safe_load(last_path, "last.pt") if os.path.isfile(last_path) else None
    log_path = os.path.join(folder, "log.jsonl")
    rows = read_jsonl(log_path, complete_only=True) if os.path.isfile(log_path) else []
    write_jsonl(log_path, rows[:last["n_rows"]] if last else [])
    where = (f"stage {last['stage']}, " if "stage" in last else "") + f"epoch {last['epoch']}" if last else None
    out(f"run folder: {folder} (resumed " + (f"at {where})" if where else "from the start: no epoch had completed)"))
    return folder, last


def save_last(folder, payload):
    atomic_torch_save(payload, os.path.join(folder, LAST))


def rng_states(generator):
    states = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(generator, states):
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def resume_hint(folder):
    """The command that continues a stopped run: this one, with ``--output_dir folder --resume``."""
    argv = list(sys.argv)
    if "--output_dir" not in argv:
        argv += ["--output_dir", folder]
    if "--resume" not in argv:
        argv.append("--resume")
    return "python " + " ".join(argv)
