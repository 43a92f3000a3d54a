"""A graceful stop: Ctrl-C (SIGINT) or SIGTERM asks the training loop to stop after the current step.

    with stop_on_signals():
        ...            # helper.train.engine.run_epoch calls check() after every step

The first signal only sets a flag; ``check()`` then raises ``Interrupted`` between two steps, the loop
returns, and the run writes what it has (``"stopped": "interrupted"``) and says how to continue with
``--resume``. A second signal interrupts at once (KeyboardInterrupt), for a run that hangs.
"""
import contextlib
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested = []


class Interrupted(Exception):
    """Raised between two steps once a stop was asked for; ``signum`` is the signal's number."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def request(signum):
    """Ask for a stop, as the signal handler does (tests call it directly)."""
    _requested.append(signum)


def check():
    """Raise ``Interrupted`` if a stop was asked for (and forget the request)."""
    if _requested:
        raise Interrupted(_requested.pop())


def clear():
    _requested.clear()


@contextlib.contextmanager
def stop_on_signals():
    """Install the SIGINT/SIGTERM handlers for the ``with`` block (main thread only; elsewhere a no-op)."""
    def handler(signum, frame):
        if _requested:  # the second signal: stop now
            raise KeyboardInterrupt
        request(signum)
        print(f"\n{signal.Signals(signum).name}: stopping after the current step (send it again to stop at once)",
              file=sys.stderr, flush=True)

    try:
        previous = {s: signal.signal(s, handler) for s in SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    clear()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        clear()
