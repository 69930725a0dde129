"""The command line explains itself: every command listed with a line, every option with a
help text and its default, no reST markup; errors are one line, --debug adds the traceback."""

from __future__ import annotations

import argparse
import re

import pytest

from attnlab.cli import info as info_cli
from attnlab.cli import plain
from attnlab.cli.main import build_parser, main


def _parsers(parser: argparse.ArgumentParser, path: str = "attnlab"):
    """``(command path, parser, its subcommands action or None)`` of every parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    yield path, parser, subs[0] if subs else None
    for action in subs:
        for name, child in action.choices.items():
            yield from _parsers(child, f"{path} {name}")


PARSERS = list(_parsers(build_parser()))


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_walk_reaches_every_command():
    paths = {p for p, _, _ in PARSERS}
    for want in ("attnlab list", "attnlab info", "attnlab compare", "attnlab report",
                 "attnlab show-attention", "attnlab bench run", "attnlab bench plot",
                 "attnlab train", "attnlab inpaint"):
        assert want in paths
    assert len(paths) >= 18


@pytest.mark.parametrize(("path", "parser"), [(p, q) for p, q, _ in PARSERS],
                         ids=[p for p, _, _ in PARSERS])
def test_every_option_has_a_help_text_without_rest_markup(path, parser):
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{path} {name}: no help text"
        assert "``" not in action.help, f"{path} {name}: reST markup in {action.help!r}"
    text = parser.format_help()  # also: every help string formats (a bare % would raise)
    assert "``" not in text and ":func:" not in text and ":mod:" not in text, text
    assert "default: None" not in text and "default: False" not in text, text


@pytest.mark.parametrize(("path", "parser", "subs"), [t for t in PARSERS if t[2]],
                         ids=[p for p, _, s in PARSERS if s])
def test_every_command_is_listed_with_a_line(path, parser, subs):
    text = _flat(parser.format_help())
    listed = {a.dest: a.help for a in subs._choices_actions}
    assert set(listed) == set(subs.choices), f"{path}: commands without a help line"
    for name, help_text in listed.items():
        assert help_text and "``" not in help_text, (path, name)
        assert f"{name} {_flat(help_text)}" in text, f"{path} --help does not list {name}"


def test_defaults_are_shown_only_where_there_is_one():
    flat = _flat(dict((p, q) for p, q, _ in PARSERS)["attnlab verify"].format_help())
    assert "sequence length (default: 64)" in flat
    assert "floating point type of the inputs (default: float32)" in flat
    assert re.search(r"--causal check the causal forms(?! \(default)", flat)  # a switch
    train = _flat(dict((p, q) for p, q, _ in PARSERS)["attnlab train"].format_help())
    assert "one run per seed (default: 0)" in train
    bench = _flat(dict((p, q) for p, q, _ in PARSERS)["attnlab bench run"].format_help())
    assert "90% of the RAM" in bench and "head counts (default: the profile's, else 8)" in bench
    show = _flat(dict((p, q) for p, q, _ in PARSERS)["attnlab bench show"].format_help())
    assert "run id (default: latest)" in show


def test_top_level_help_is_plain_text_and_lists_the_main_job(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and "attnlab compare" in out and "--debug" in out
    for name in ("compare", "report", "show-attention", "bench", "info"):
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", out, re.M), name


def test_plain_strips_rest_roles_and_literals():
    assert plain("``attnlab bench`` and :func:`~attnlab.report.build.build_report`, "
                 ":mod:`attnlab.compare`::\n") == (
        "attnlab bench and attnlab.report.build.build_report, attnlab.compare:\n")
    assert plain(None) == ""


# ----------------------------------------------------------------------------- --debug
@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("ATTNLAB_DEBUG", raising=False)


@pytest.mark.parametrize("argv", [["info", "flsh"], ["--debug", "info", "flsh"],
                                  ["info", "flsh", "--debug"]])
def test_a_failing_command_prints_one_line_and_debug_adds_the_traceback(argv, capsys):
    assert main(argv) == 2  # the user's input: exit 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "unknown name 'flsh'" in lines[-1]
    if "--debug" in argv:
        assert lines[0] == "Traceback (most recent call last):" and "registry.py" in err
    else:
        assert len(lines) == 1 and "Traceback" not in err


def test_debug_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("ATTNLAB_DEBUG", "1")
    assert main(["info", "flsh"]) == 2
    assert "Traceback (most recent call last):" in capsys.readouterr().err
    monkeypatch.setenv("ATTNLAB_DEBUG", "0")
    assert main(["info", "flsh"]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("debug", [False, True])
def test_a_defect_says_so_and_debug_shows_where(debug, monkeypatch, capsys):
    def broken(args, console):
        raise RuntimeError("boom")

    monkeypatch.setattr(info_cli, "cmd_info", broken)
    assert main(["info", "sdpa", *(["--debug"] if debug else [])]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: internal error (RuntimeError: boom); this is a defect of attnlab: run again "
        "with --debug and report the traceback")
    assert ("Traceback" in err and "in broken" in err) is debug
