"""The ``attnlab`` command line."""

import shlex
import sys


def command_line() -> str:
    """This invocation as a shell command (quoted), stored with results to reproduce them."""
    return "attnlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
