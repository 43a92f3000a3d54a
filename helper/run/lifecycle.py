"""One run's life, the same for a defense run (``helper.jobs.distill``) and an attack (``helper.attacks``); the scan
(``helper.jobs.scan``, seconds long and not resumable) opens its folder with step 1 alone:

1. ``Life.open``: the run folder made (args.json) or, with ``--resume``, the unfinished one checked and reopened
   (``helper.run.resume.open_or_resume``); a finished one raises ``Finished``;
2. the generator its batches draw from, seeded with ``--seed``; ``restore_rng()`` sets it and torch's own generator
   to ``last.pt``'s states once the run has built what draws from torch's generator (fresh weights), as the run made
   straight through had; the log rows written so far; the clock, continued across a resume;
3. ``save(epoch, total, state, n_rows)``: ``last.pt`` every ``--checkpoint_every`` epochs and at the last, with the
   generator's state, the rows written and the time spent beside the run's own ``state``;
4. ``signals()``: SIGINT and SIGTERM stop the run between two steps (``helper.run.interrupt``);
5. ``end(result, done, total, keep)``: a stopped fit ends the run the same way everywhere: ``keep(why)`` writes what
   the run has (``why``: "interrupted" or the non-finite loss), then ``Stopped`` with the command that resumes it, or
   one ``UserError``.
"""
import os
import signal
import time

import torch

from helper.run.errors import Stopped, UserError
from helper.run.interrupt import stop_on_signals
from helper.run.resume import open_or_resume, resume_hint, rng_states, save_last, set_rng_states
from helper.run.runlog import read_jsonl


class Life:
    """A run's folder, generator, rows so far and clock (module docstring); built by ``open``."""

    def __init__(self, args, folder, last, device):
        self.args, self.folder, self.last, self.device = args, folder, last, device
        self.log_path = os.path.join(folder, "log.jsonl")
        self.generator = torch.Generator(device=device).manual_seed(args.seed)
        self.rows = read_jsonl(self.log_path) if last is not None else []
        self.start_clock()

    @classmethod
    def open(cls, args, name, record, out=print, defaults=None, resolved=None, device=None):
        """Open (or with ``--resume`` reopen) the folder of a run named ``name`` (``-MSG`` added from ``--msg``);
        ``record`` goes into args.json. Raises ``Finished`` for a finished one."""
        name += f"-{args.msg}" if getattr(args, "msg", "") else ""
        folder, last = open_or_resume(args, name, record, out, defaults, resolved=resolved, device=device)
        return cls(args, folder, last, device)

    def restore_rng(self):
        """A resumed run: the generator's and torch's states of ``last.pt`` (call it after building the models)."""
        if self.last is not None:
            set_rng_states(self.generator, self.last["rng"], self.device)

    def start_clock(self):
        """Count the run's time from now (and from what ``last.pt`` had spent): its set-up is not training time."""
        self.start = time.time() - (self.last["elapsed"] if self.last is not None else 0.0)

    def elapsed(self):
        return time.time() - self.start

    def save(self, epoch, total, state, n_rows):
        """``last.pt`` after ``epoch`` (of ``total`` in the phase) when ``--checkpoint_every`` says so or it is the
        last: ``state`` (the run's own: models, optimisers, the next epoch), the generator, ``n_rows``, the time."""
        if (epoch + 1) % self.args.checkpoint_every and epoch + 1 < total:
            return
        save_last(self.folder, {**state, "rng": rng_states(self.generator, self.device), "n_rows": n_rows,
                                "elapsed": self.elapsed()})

    @staticmethod
    def signals():
        return stop_on_signals()

    def end(self, result, done, total, keep, hint=""):
        """Nothing when ``result`` (a ``Fit``) ran through; else ``keep(result.stopped)`` and the stop: ``Stopped`` for
        a signal, ``UserError`` for a non-finite loss (``hint``: what to try). ``done`` of ``total`` epochs ran."""
        if not result.stopped:
            return
        keep(result.stopped)
        if result.stopped == "interrupted":
            raise Stopped(f"interrupted by {signal.Signals(result.signum).name} after {done} of {total} epochs; what "
                          f"was written is kept in {self.folder}; continue with: {resume_hint(self.folder)}",
                          result.signum)
        raise UserError(f"{result.stopped}; stopped, what was written is kept in {self.folder}{hint}")
