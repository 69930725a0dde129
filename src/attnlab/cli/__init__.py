"""The attnlab command line: shared helpers of its subcommand modules."""

import argparse
import re
import shlex
import sys

__all__ = ["HelpFormatter", "Parser", "command_line", "plain", "positive_int"]


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


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :func:`~attnlab.x.f` -> attnlab.x.f


def plain(doc: str | None) -> str:
    """A module docstring as terminal text: reST roles and ``literals`` without their
    markup (``attnlab bench`` -> attnlab bench; :func:`~a.b.f` -> f)."""
    text = _ROLE.sub(lambda m: m.group(1), doc or "")
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return text.replace("::\n", ":\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their lines (their examples stay examples); every option's help
    ends with its default, except where it has none (``None`` or ``""``), is an on/off
    switch (``--json``: its help says what it does) or already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.nargs == 0 or default is None or default is argparse.SUPPRESS
                or default == "" or "default" in text
                or (not action.option_strings and action.nargs not in ("?", "*"))):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults (:class:`HelpFormatter`); its
    subcommands' parsers are of this class too (argparse makes them of the parent's)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
