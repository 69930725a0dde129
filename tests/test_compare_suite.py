"""The default comparison: a suite of studies sharing one benchmark sweep."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from attnlab.cli.main import main
from attnlab.compare.suite import (
    DEFAULT_MECHANISMS,
    STUDIES,
    Suite,
    is_suite,
    make_suite,
    read_suite,
    run_suite,
)
from attnlab.registry import get
from attnlab.report.suite import build_suite_report
from attnlab.train.config import ConfigError
from attnlab.train.task import get_task

pytest.importorskip("matplotlib")


def tiny_suite(mechanisms=("sdpa", "sliding_window"), seeds=(0, 1)) -> Suite:
    """The default suite's studies at a few steps and examples, a two-length sweep."""
    suite = make_suite(mechanisms=list(mechanisms), seeds=list(seeds), max_steps=4)
    studies = {}
    for label, plan in suite.studies.items():
        tk = {**plan.train["task_kwargs"], "n_train": 64, "n_validation": 16, "n_test": 32}
        if "length" in tk:  # the long study's form, at a length a test can afford
            tk["length"] = 64
        studies[label] = dataclasses.replace(plan, train={
            **plan.train, "task_kwargs": tk, "eval_every": 2, "checkpoint_every": 2,
            "batch_size": 8, "warmup_steps": 1})
    bench = {**suite.bench, "lengths": [64, 128], "passes": ["fwd"], "min_run_time": 0.01,
             "heads": [2], "head_dim": [16], "threads": 1}
    return dataclasses.replace(suite, bench=bench, studies=studies)


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "run"
    state = run_suite(tiny_suite(), out, jobs=1, progress=False, command="attnlab test")
    assert not (out / "report").exists()  # compare runs; the report is built from its files
    build_suite_report(out)
    return out, state


def test_the_default_suite_measures_what_it_advises_about_and_needs_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    suite = make_suite()
    assert suite.mechanisms == DEFAULT_MECHANISMS and list(suite.studies) == list(STUDIES)
    # Every default mechanism is causal (both studies decode left to right); each study
    # trains the defaults but those it leaves out for their cost, and a user's list whole.
    assert all(get(m).causal for m in suite.mechanisms)
    for label, plan in suite.studies.items():
        skip = STUDIES[label].get("default_skip", ())
        assert plan.mechanisms == tuple(m for m in DEFAULT_MECHANISMS if m not in skip)
    asked = make_suite(mechanisms=["sdpa", "reformer"])
    assert all(p.mechanisms == ("sdpa", "reformer") for p in asked.studies.values())
    assert all(not p.skipped and len(p.seeds) >= 3 for p in suite.studies.values())
    b = suite.bench
    assert max(b["lengths"]) >= 4096 and b["passes"] == ["fwd", "fwd+bwd"]
    assert b["causal"] == [True]
    for plan in suite.studies.values():  # the data are generated here, offline
        cfg = plan.config(plan.mechanisms[0], 0)
        task = get_task(plan.task)(dataclasses.replace(
            cfg, task_kwargs={**cfg.task_kwargs, "n_train": 32}))
        task.setup()
    long = suite.studies["long_recall"].train["task_kwargs"]["length"]
    assert long >= 512


def test_the_suite_round_trips_and_a_bad_profile_is_refused():
    suite = make_suite(mechanisms=["sdpa", "linear"], seeds=[0, 1])
    assert Suite.from_json(suite.to_json()) == suite
    with pytest.raises(ConfigError, match=r"no profile 'quik' \(did you mean 'quick'\?\)"):
        make_suite(profile="quik")
    with pytest.raises(ConfigError, match="did you mean 'sdpa'"):
        make_suite(mechanisms=["sdpaa"])


def test_a_suite_runs_one_sweep_then_every_study_and_reports_them_side_by_side(suite_run):
    out, state = suite_run
    assert is_suite(out) and read_suite(out) == tiny_suite()
    assert set(state["studies"]) == {"recall", "long_recall"}
    for label in ("recall", "long_recall"):
        assert (out / label / "report" / "report.html").is_file()
        assert not (out / label / "results.db").exists() or \
            (out / label / "results.db").stat().st_size > 0
        for m in ("sdpa", "sliding_window"):
            for s in (0, 1):
                assert (out / label / "train" / m / f"seed-{s}" / "summary.json").is_file()
    md = (out / "report" / "report.md").read_text()
    for heading in ("## Quality per study", "## Time and memory",
                    "## Advisor, with the quality of recall",
                    "## Advisor, with the quality of long_recall"):
        assert heading in md
    assert "| mechanism | recall: test accuracy | long_recall: test accuracy |" in md
    assert "(measured)" in md and "extrapolated" not in md.split("## Advisor")[1].split(
        "```")[0].replace("extrapolated with", "")


def test_a_rerun_trains_nothing_and_report_rebuilds_the_suite(suite_run, capsys):
    out, _ = suite_run
    summaries = sorted(out.glob("*/train/*/seed-*/summary.json"))
    before = [p.stat().st_mtime_ns for p in summaries]
    run_suite(tiny_suite(), out, jobs=1, progress=False)
    assert len(summaries) == 8 and [p.stat().st_mtime_ns for p in summaries] == before
    (out / "report" / "report.md").unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "report.md").is_file()
    text = capsys.readouterr().out
    assert text.rstrip().endswith(f"(Markdown: {out / 'report' / 'report.md'})")
    assert f"open {out / 'report' / 'report.html'}" in text


def _rows(text: str, title: str) -> dict[str, list[str]]:
    """The rows of the terminal table titled ``title``, by mechanism."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line)
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("└"):
            break
        if line.startswith(("│", "┃")):  # rich draws the header row heavy
            bar = line[0]
            cells = [c.strip() for c in line.strip(f"{bar} ").split(bar)]
            rows[cells[0]] = cells[1:]
    return rows


def test_the_terminal_shows_one_leaderboard_per_study(suite_run, tmp_path, capsys):
    """The suite's terminal view: one table per study, its quality the suite report's
    (mean ± CI, the same marks) and the sweep's time at the longest length."""
    out, _ = suite_run
    assert main(["report", str(out), "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    md = (tmp_path / "r" / "report.md").read_text()

    def section(title: str) -> dict[str, list[str]]:  # the rows of that section's table
        body = md.split(f"## {title}\n")[1].split("\n## ")[0]
        return {line.split(" | ")[0].strip("| "): line.strip(" |").split(" | ")[1:]
                for line in body.splitlines() if line.startswith(("| sdpa ", "| sliding_"))}

    quality = section("Quality per study")
    t128 = {m: cells[1] for m, cells in section("Time and memory").items()}  # time @ 128
    for i, label in enumerate(("recall", "long_recall")):
        rows = _rows(text, f"{label} (mqar): leaderboard, time and memory at N=128")
        assert set(rows) >= {"mechanism", "sdpa", "sliding_window"}, text
        assert rows["mechanism"] == ["test accuracy", "vs best", "vs sdpa", "time N=128",
                                     "mem N=128"]
        for m in ("sdpa", "sliding_window"):
            mean = float(quality[m][i].split(" ")[0])  # the suite's "0.123 ± 0.045 mark"
            assert float(rows[m][0].split(" ")[0]) == pytest.approx(mean, abs=5e-4), (
                rows[m], quality[m])
            assert rows[m][3] == t128[m]


def test_another_suite_in_the_same_directory_is_refused(suite_run):
    out, _ = suite_run
    with pytest.raises(ConfigError, match="holds another comparison"):
        run_suite(tiny_suite(seeds=(0, 1, 2)), out, jobs=1, progress=False)
