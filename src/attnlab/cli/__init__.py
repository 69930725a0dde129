"""The ``attnlab`` command line."""

import argparse
import shlex
import sys


def command_line() -> str:
    """This invocation as a shell command (quoted), stored with results to reproduce them."""
    return "attnlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count or a size), refused with the value given."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {value}")
    return value
