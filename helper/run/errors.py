"""One exception type for bad input: the entry scripts print its message as one line and exit non-zero."""
import functools
import sys


class UserError(Exception):
    """Bad input a user can fix (a missing file, a wrong shape, an unknown name). Never a bug."""
    code = 2


class Stopped(UserError):
    """A run stopped by a signal after writing what it had; exits with 128 + the signal's number."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.code = 128 + signum


def exits_cleanly(main):
    """Decorate an entry point so a UserError becomes ``error: <message>`` on stderr and its exit code (2;
    128 + signal for a stopped run)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"{'stopped' if isinstance(e, Stopped) else 'error'}: {e}", file=sys.stderr)
            sys.exit(e.code)

    return wrapper
