"""One exception type for bad input: the entry scripts print its message as one line and exit non-zero."""
import functools
import sys


class UserError(Exception):
    """Bad input a user can fix (a missing file, a wrong shape, an unknown name). Never a bug."""


def exits_cleanly(main):
    """Decorate an entry point so a UserError becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
