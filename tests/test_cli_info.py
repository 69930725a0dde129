"""attnlab info NAME says where everything is; docs/mechanisms.md is the registry's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from attnlab.cli import info as info_cli
from attnlab.cli.docs import REFRESH
from attnlab.cli.main import build_parser, main
from attnlab.registry import get, list_mechanisms

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "mechanisms.md"
NAMES = list_mechanisms(inputs=None)  # the graph and pair ones too


def _info(name: str, capsys) -> str:
    assert main(["info", name]) == 0
    return " ".join(capsys.readouterr().out.split())  # rich folds long lines at 160 columns


@pytest.mark.parametrize("name", NAMES)
def test_info_points_at_the_class_its_tests_its_bench_command_and_its_paper(name, capsys):
    spec = get(name)
    out = _info(name, capsys)
    m = re.search(rf"class {spec.cls.__name__} in (\S+):(\d+)", out)
    assert m, out
    # the file and line, read independently of inspect: the line is the class statement
    path, line = ROOT / m.group(1), int(m.group(2))
    assert m.group(1).startswith("src/attnlab/mechanisms/") and path.is_file()
    text = path.read_text().splitlines()[line - 1]
    assert re.match(rf"class {spec.cls.__name__}\b", text), text
    tests = f"tests/test_{spec.family}.py"
    if (ROOT / tests).is_file():
        assert f"tests {tests}" in out
    else:
        assert f"the {spec.family} family's would be {tests}" in out
    bench = f"attnlab bench run --mechanisms {name} --n 1024 4096 --pass both"
    if spec.inputs == "qkv":
        assert f"bench {bench}" in out
    else:  # outside the benchmark lab's (q, k, v) calls: said so, no command that would fail
        assert f"bench none by name: it takes {spec.inputs} inputs" in out
    p = spec.paper
    for part in (p.title, p.authors, str(p.year), p.url):
        assert " ".join(part.split()) in out, part


def test_the_bench_command_is_a_valid_command_line():
    args = build_parser().parse_args(info_cli.bench_command("sdpa").split()[1:])
    assert (args.command, args.bench_command, args.mechanisms, args.lengths, args.passes) == (
        "bench", "run", ["sdpa"], [1024, 4096], "both")


def test_outside_a_source_checkout_info_says_where_the_tests_would_be(monkeypatch, capsys):
    monkeypatch.setattr(info_cli, "repo_root", lambda: None)
    assert info_cli.test_file("exact") == ("tests/test_exact.py", False)
    out = _info("sdpa", capsys)
    assert "tests/test_exact.py in a source checkout (tests are not installed" in out
    assert re.search(r"class \w+ in attnlab/mechanisms/\S+\.py:\d+", out), out


def test_the_checkout_is_found():
    assert info_cli.repo_root() == ROOT


@pytest.mark.parametrize(("argv", "message"), [
    (["info"], "info: expected a mechanism NAME (see `attnlab list`) or --markdown; got neither"),
    (["info", "sdpa", "--markdown"], "info: give NAME or --markdown (every mechanism), not "
                                     "both; got NAME 'sdpa' and --markdown"),
])
def test_info_needs_a_name_or_markdown(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


# ---------------------------------------------------------------------- docs/mechanisms.md
def _markdown(capsys) -> str:
    assert main(["info", "--markdown"]) == 0
    return capsys.readouterr().out


def test_docs_mechanisms_md_is_up_to_date(capsys):
    fresh = _markdown(capsys)
    assert DOC.is_file(), f"docs/mechanisms.md is missing: create it with `{REFRESH}`"
    assert DOC.read_text() == fresh, (
        f"docs/mechanisms.md is stale (the registry changed): refresh it with `{REFRESH}`")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_the_table_has_one_row_per_mechanism_with_the_registry_s_facts(capsys):
    lines = _markdown(capsys).splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| name |"))
    cols = _cells(lines[head])
    rows = [dict(zip(cols, _cells(line), strict=True)) for line in lines[head + 2:]
            if line.startswith("|")]
    assert [r["name"].split()[0].strip("`") for r in rows] == NAMES
    quadratic = re.compile(r"N\s*\^\s*2")  # an independent reading of the claims
    for r in rows:
        s = get(r["name"].split()[0].strip("`"))
        assert r["family"] == s.family
        assert r["exact"] == ("yes" if s.exact else "-")
        assert r["causal"] == ("yes" if s.causal else "-")
        assert r["sub-quadratic"] == ("-" if quadratic.search(s.memory) else "yes")
        assert r["time"] == f"`{s.time}`".replace("|", "\\|")
        assert f"({s.paper.url})" in r["paper"] and s.paper.title in r["paper"]
        for h in s.hparams:
            assert f"`{h.name}={h.describe_default()}`" in r["default hyperparameters"]
    assert sum(r["sub-quadratic"] == "yes" for r in rows) not in (0, len(rows))


def test_the_readme_links_the_table():
    assert "(docs/mechanisms.md)" in (ROOT / "README.md").read_text()
