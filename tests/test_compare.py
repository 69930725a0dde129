"""attnlab compare: the plan, a tiny end-to-end run, resume, and a report from stored numbers."""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3

import pytest

from attnlab.bench.analysis import format_time
from attnlab.cli.compare import parse_question
from attnlab.cli.main import main
from attnlab.compare import make_plan, run_compare
from attnlab.compare import run as run_module
from attnlab.compare.plan import PROFILES, load_or_save
from attnlab.registry import list_mechanisms
from attnlab.report.build import build_report
from attnlab.train.config import ConfigError
from attnlab.train.loop import load_trained as _real_load

pytest.importorskip("matplotlib")

SECTIONS = ("summary", "leaderboard", "training", "scaling", "attention", "patterns",
            "advisor", "reproduce")
XSS = "<script>alert(1)</script>"


def tiny_plan(mechanisms=("sdpa", "sliding_window"), seeds=(0, 1)):
    plan = make_plan(mechanisms=list(mechanisms), seeds=list(seeds), max_steps=6)
    train = {**plan.train, "eval_every": 3, "checkpoint_every": 3, "warmup_steps": 1,
             "batch_size": 16, "model_kwargs": {"d_model": 16, "num_layers": 1,
                                                "num_heads": 2},
             "task_kwargs": {**plan.train["task_kwargs"], "n_train": 200, "n_validation": 40,
                             "n_test": 40}}
    bench = {**plan.bench, "lengths": [64, 128], "min_run_time": 0.01, "heads": [2],
             "head_dim": [16], "threads": 1}
    return dataclasses.replace(plan, train=train, bench=bench)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One tiny compare (2 mechanisms x 2 seeds) and its report, the sample text holding a
    script tag."""
    out = tmp_path_factory.mktemp("compare") / "run"
    mp = pytest.MonkeyPatch()
    from attnlab.report import samples
    real = samples.pick_text
    mp.setattr(samples, "pick_text", lambda task, n: (f"{XSS} " + real(task, n)[0], "x"))
    try:
        state = run_compare(tiny_plan(), out, jobs=1, progress=False, command="attnlab test")
        build_report(out)
    finally:
        mp.undo()
    return out, state


# ------------------------------------------------------------------------------- the plan
def test_default_plan_is_every_mechanism_on_the_embedded_task_quick():
    plan = make_plan()
    assert plan.task == "listops" and plan.profile == "quick"
    assert list(plan.mechanisms) == list_mechanisms()
    # ListOps pads its batches: only the mechanisms that cannot take padding sit out
    assert set(plan.skipped) == set(list_mechanisms(key_padding=False))
    assert plan.seeds == tuple(PROFILES["quick"]["seeds"])
    cfg = plan.config("reformer", 1)
    assert cfg.seed == 1 and cfg.mechanism == "reformer" and cfg.threads == 1
    assert cfg.mechanism_kwargs == {"bucket_size": 8}
    assert cfg.task_kwargs["max_len"] % cfg.task_kwargs["pad_multiple"] == 0
    assert plan.digest() == make_plan().digest()
    assert plan.digest() != make_plan(seeds=[0]).digest()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mechanisms": ["sdpa", "perfomer"]}, r"--mechanisms: .*'perfomer'.*did you mean 'performer'"),
    ({"mechanisms": ["sdpa", "sdpa"]}, "given twice"),
    ({"profile": "quik"}, r"unknown profile 'quik' \(did you mean 'quick'\?\)"),
    ({"task": "listop"}, r"unknown task 'listop'.*did you mean 'listops'"),
    ({"seeds": [1, 1]}, "--seeds: expected distinct"),
    ({"max_steps": 0}, "max_steps must be an int >= 1"),
])
def test_bad_plans_are_refused_with_the_argument_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_plan(**kwargs)


def test_a_causal_task_skips_the_mechanisms_without_a_causal_form():
    plan = make_plan(task="copy", mechanisms=["sdpa", "nystromformer", "linear"])
    assert plan.trained() == ["sdpa", "linear"]
    assert "no causal form" in plan.skipped["nystromformer"]


def test_a_padded_task_skips_the_mechanisms_without_key_padding():
    plan = make_plan(task="listops", mechanisms=["sdpa", "fnet", "linear"])
    assert plan.trained() == ["sdpa", "linear"]
    assert "no key-padding mask" in plan.skipped["fnet"]
    # a task of fixed-size inputs (no padding) trains it
    assert "fnet" in make_plan(task="inpaint_digits", mechanisms=["sdpa", "fnet"]).trained()


def test_another_plan_in_the_same_directory_is_refused(tmp_path):
    assert load_or_save(tiny_plan(), tmp_path) is False
    assert load_or_save(tiny_plan(), tmp_path) is True  # same plan: resume
    with pytest.raises(ConfigError, match=r"another comparison \(it differs in .*mechanisms\)"):
        load_or_save(tiny_plan(mechanisms=("sdpa",)), tmp_path)


@pytest.mark.parametrize(("text", "want"), [
    ("4096", (4096, None)), ("4096:512MiB", (4096, 512 * 2**20)),
    ("16384:2g", (16384, 2 * 2**30)), ("100:1000", (100, 1000)), ("8 : 1.5 KiB", (8, 1536)),
])
def test_advisor_questions_parse(text, want):
    assert parse_question(text) == want


@pytest.mark.parametrize("text", ["", "x", "4096:", "4096:5parsecs", "0", "-5:1G"])
def test_bad_advisor_questions_are_refused(text):
    with pytest.raises(ConfigError, match="--advise"):
        parse_question(text)


# ---------------------------------------------------------------------------- a tiny run
def test_compare_writes_html_markdown_and_pngs_with_every_section(compared):
    out, state = compared
    html = (out / "report" / "report.html").read_text()
    md = (out / "report" / "report.md").read_text()
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in html and f'href="#{anchor}"' in html
    for title in ("## Leaderboard", "## Advisor", "## Attention maps", "## Reproduce"):
        assert title in md
    pngs = sorted(p.name for p in (out / "report" / "figures").rglob("*.png"))
    for stem in ("loss_curves", "loss_curves-panels", "pareto_quality_throughput",
                 "attention_overview", "attention-sdpa", "attention-sliding_window",
                 "sparsity_patterns"):
        assert f"{stem}.png" in pngs
    assert any(p.startswith("time_vs_n-fwd") for p in pngs)
    assert any(p.startswith("memory_vs_n-fwd") for p in pngs)
    for link in re.findall(r"\]\(<([^>]+)>\)", md):  # every Markdown figure link resolves
        assert (out / "report" / link).is_file(), link
    assert html.count("<svg") >= 9 and "<script" not in html
    assert "http://" not in html.replace("http://www.w3.org/", "")
    assert "attnlab test" in html  # the exact command, for reproduction
    assert "throughput: training tokens/s" in html


def test_dataset_text_is_escaped(compared):
    out, _ = compared
    html = (out / "report" / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and XSS not in html


def test_report_numbers_come_from_the_results_database(compared, tmp_path):
    out, _ = compared
    db = sqlite3.connect(out / "results.db")
    vals = [v for (v,) in db.execute(
        "SELECT test_value FROM trainings WHERE mechanism='sdpa' ORDER BY seed")]
    assert len(vals) == 2
    t = db.execute("SELECT time_s FROM measurements WHERE label='sdpa' AND N=128").fetchone()[0]
    md = (out / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| sdpa |"))
    assert f"{sum(vals) / 2:.4g}" in row and format_time(t) in row
    f1 = [json.loads(v)["test"]["macro_f1"] for (v,) in db.execute(
        "SELECT summary FROM trainings WHERE mechanism='sdpa' ORDER BY seed")]
    lines = md.splitlines()
    h = lines.index("| mechanism | accuracy | macro_f1 |")  # the every-test-metric table
    f1_row = next(line for line in lines[h:] if line.startswith("| sdpa |"))
    assert f1_row.split(" | ")[2].startswith(f"{sum(f1) / 2:.4g} ± ")
    # Change the stored numbers: the rebuilt report follows them, nothing else.
    db.execute("UPDATE trainings SET test_value=0.123 WHERE mechanism='sdpa'")
    db.execute("UPDATE trainings SET summary=json_set(summary, '$.test.accuracy', 0.123) "
               "WHERE mechanism='sdpa'")
    db.execute("UPDATE measurements SET time_s=9.87 WHERE label='sdpa' AND N=128")
    db.commit()
    db.close()
    build_report(out, out=tmp_path / "rebuilt")
    row = next(line for line in (tmp_path / "rebuilt" / "report.md").read_text().splitlines()
               if line.startswith("| sdpa |"))
    assert "0.123 ± 0" in row and "9.87 s" in row


def test_rerun_resumes_and_trains_nothing_again(compared, monkeypatch):
    out, _ = compared
    stamps = {p: p.stat().st_mtime_ns for p in (out / "train").rglob("summary.json")}
    assert len(stamps) == 4
    monkeypatch.setattr(run_module, "_train_one",
                        lambda *a: pytest.fail("a finished run was trained again"))
    run_compare(tiny_plan(), out, jobs=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    n = sqlite3.connect(out / "results.db").execute("SELECT COUNT(*) FROM trainings")
    assert n.fetchone()[0] == 4
    state = json.loads((out / "state.json").read_text())
    assert state["resumed"] == 1 and state["command"] == "attnlab test"


def test_an_interrupted_compare_resumes_where_it_stopped(tmp_path, monkeypatch):
    plan = tiny_plan(mechanisms=("sdpa",))
    real, calls = run_module._train_one, []

    def once_then_stop(cfg, d):
        calls.append(cfg["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, d)

    monkeypatch.setattr(run_module, "_train_one", once_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_compare(plan, tmp_path, jobs=1, progress=False)
    monkeypatch.setattr(run_module, "_train_one", lambda cfg, d: calls.append(cfg["seed"])
                        or real(cfg, d))
    run_compare(plan, tmp_path, jobs=1, progress=False)
    assert calls == [0, 1, 1]  # seed 0 kept, seed 1 trained after the interrupt
    rows = sqlite3.connect(tmp_path / "results.db").execute(
        "SELECT seed FROM trainings ORDER BY seed").fetchall()
    assert rows == [(0,), (1,)]


def test_cli_report_and_show_attention(compared, tmp_path, capsys):
    out, _ = compared
    assert main(["report", str(out), "--out", str(tmp_path / "r"), "--advise",
                 "100000:1MiB"]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "N=100000 (memory budget 1 MiB)" in md
    assert main(["report", str(out), "--out", str(tmp_path / "r2"), "--advise", "512"]) == 0
    assert "The advisor's pick at N=512: " in (tmp_path / "r2" / "report.md").read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a compare run directory" in capsys.readouterr().err
    seed = out / "train" / "sdpa" / "seed-0"
    png = tmp_path / "map.png"
    assert main(["show-attention", "--checkpoint", str(seed / "best.pt"), "--text",
                 "[MAX 1 [MIN 3 4 ] 2 ]", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000 and png.with_suffix(".svg").is_file()
    assert main(["show-attention", "--checkpoint", str(tmp_path), "--text", "1"]) == 2


def test_the_report_opens_in_a_real_browser(compared, tmp_path):
    """Headless chromium: no console errors, no network, every figure drawn, the dataset's
    script tag shown as text (never run), and a screenshot."""
    from attnlab.report.browser import BrowserNotFound, open_in_browser
    out, _ = compared
    try:
        check = open_in_browser(out / "report" / "report.html", screenshot=tmp_path / "r.png")
    except BrowserNotFound as e:
        pytest.skip(str(e))
    assert check.problems == [] and not check.dialogs and check.scripts == 0
    assert check.console_errors == [] and check.requests == []
    assert (out / "report" / "report.html").resolve().as_uri() in check.urls
    assert all(u.startswith(("file://", "data:")) for u in check.urls), check.urls
    html = (out / "report" / "report.html").read_text()
    assert len(check.figures) == html.count("<figure>") >= 9
    assert all(f["width"] > 50 and f["height"] > 50 and f["drawn"] > 0 for f in check.figures)
    board = next(t for t in check.tables if t["section"] == "leaderboard")  # its first table
    assert board["header"][0] == "mechanism" and board["header"][1].startswith("test ")
    assert "crossover vs sdpa" in board["header"]
    assert board["rows"] >= 2 and board["width"] > 200 and board["height"] > 50
    assert XSS in check.text
    png = check.screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert int.from_bytes(png[16:20], "big") == 1280  # the default viewport's width


def test_an_inpainting_compare_shows_the_images(tmp_path, monkeypatch):
    plan = make_plan(task="inpaint_digits", mechanisms=["performer"], seeds=[0], max_steps=4)
    plan = dataclasses.replace(
        plan, train={**plan.train, "batch_size": 16, "eval_every": 2, "eval_batches": 1,
                     "model_kwargs": {"d_model": 16, "num_layers": 1, "num_heads": 2}},
        bench={**tiny_plan().bench, "mechanisms": ["performer"]})
    run_compare(plan, tmp_path, jobs=1, progress=False)
    build_report(tmp_path)
    html = (tmp_path / "report" / "report.html").read_text()
    assert 'id="inpainting"' in html and "performer (" in html  # row titled with its PSNR
    assert (tmp_path / "report" / "figures" / "inpainting.png").stat().st_size > 1000
    assert "r0c0" in html  # the attention map's axis labels are the image patches
    assert "throughput: training images/s" in html
    import attnlab.report.build as build_module
    import attnlab.train.loop as loop
    calls = []
    for module in (loop, build_module):  # wherever the report looks it up
        monkeypatch.setattr(module, "load_trained", lambda d, **kw: calls.append(d)
                            or _real_load(d, **kw))
    build_report(tmp_path, out=tmp_path / "again")
    assert len(calls) == 1  # the attention maps and the images share the loaded model


def test_sigterm_stops_parallel_training_at_a_checkpoint_and_the_rerun_finishes(tmp_path,
                                                                              monkeypatch):
    """Two training processes; SIGTERM to the compare: both seeds checkpoint and stop; the
    same plan run again continues them (it does not start over) and finishes."""
    import signal
    import subprocess
    import sys
    import time
    plan = tiny_plan(mechanisms=("sdpa",))
    # long enough that neither seed can finish while the other is still starting up
    plan = dataclasses.replace(plan, train={**plan.train, "max_steps": 2000,
                                            "eval_every": 1000, "checkpoint_every": 10})
    (tmp_path / "plan.in.json").write_text(json.dumps(plan.to_json()))
    code = ("import json, sys; from attnlab.compare.plan import Plan; "
            "from attnlab.compare.run import run_compare; "
            "p = Plan.from_json(json.load(open(sys.argv[1]))); "
            "run_compare(p, sys.argv[2], jobs=2, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "plan.in.json"),
                             str(tmp_path / "run")], stderr=subprocess.PIPE, text=True)
    ckpts = [tmp_path / "run" / "train" / "sdpa" / f"seed-{s}" / "checkpoint.pt" for s in (0, 1)]
    deadline = time.monotonic() + 240
    while not all(c.exists() for c in ckpts) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "CompareInterrupted" in err
    steps = {}
    import torch
    for c in ckpts:
        assert c.exists() and not (c.parent / "summary.json").exists()
        steps[c] = torch.load(c, weights_only=True)["progress"]["step"]
        assert 0 < steps[c] < 2000
    import attnlab.train.loop as loop
    real, resumed = loop.train, []
    for module in (loop, run_module):  # wherever compare looks it up
        monkeypatch.setattr(module, "train", lambda cfg, d, **kw: resumed.append(kw["resume"])
                            or real(cfg, d, **kw), raising=module is loop)
    run_compare(plan, tmp_path / "run", jobs=1, progress=False)
    assert resumed == [True, True]  # both seeds continued from their checkpoints
    for c in ckpts:
        assert json.loads((c.parent / "summary.json").read_text())["steps"] == 2000
        evals = [json.loads(line)["step"]
                 for line in (c.parent / "metrics.jsonl").read_text().splitlines()]
        assert evals == [1000, 2000]  # one history: continued, not started over


def test_cli_report_screenshot(compared, tmp_path):
    from attnlab.report.browser import BrowserNotFound, find_browser
    try:
        find_browser()
    except BrowserNotFound as e:
        pytest.skip(str(e))
    out, _ = compared
    shot = tmp_path / "shot.png"
    assert main(["report", str(out), "--out", str(tmp_path / "r"), "--screenshot",
                 str(shot)]) == 0
    assert shot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_profile_makes_a_valid_plan_and_grid(profile):
    from attnlab.bench.grid import make_grid
    from attnlab.train.task import get_task
    plan = make_plan(profile=profile)
    bench = dict(plan.bench)
    grid = make_grid(profile=bench.pop("profile", None), **bench)
    assert len(grid.mechanisms) == len(list_mechanisms())
    opts = {**get_task("listops").options, **plan.config("reformer", 0).task_kwargs}
    assert opts["max_len"] % opts["pad_multiple"] == 0  # a padded batch still fits
    bucket = plan.config("reformer", 0).mechanism_kwargs.get("bucket_size", 64)
    assert opts["pad_multiple"] % bucket == 0 or bucket >= opts["max_len"]


def test_a_copied_run_directory_rebuilds_the_same_report(compared, tmp_path):
    import shutil
    out, _ = compared
    copy = tmp_path / "elsewhere"
    shutil.copytree(out, copy)
    build_report(out, out=tmp_path / "here")  # same sample text as the copy (no monkeypatch)
    (out / "train").rename(out / "train.away")  # the copy must not read the original
    try:
        build_report(copy)
    finally:
        (out / "train.away").rename(out / "train")
    old = (tmp_path / "here" / "report.md").read_text().splitlines()
    new = (copy / "report" / "report.md").read_text().splitlines()
    assert len(old) == len(new)
    differ = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    # only the lines naming the directory differ; every number and figure is the same
    assert differ and all(str(out) in a and str(copy) in b for a, b in differ)


def test_cli_compare_runs_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compare", "--task", "listops", "--mechanisms", "sdpa", "--max-steps", "2",
                 "--seeds", "0", "--jobs", "1", "--out", str(out), "--no-progress", "--advise",
                 "2048:64MiB"]) == 0
    text = capsys.readouterr().out
    assert "open " + str(out / "report" / "report.html") in text
    assert "(Markdown: " + str(out / "report" / "report.md") + ")" in text
    # the leaderboard ends the output; 2048 (the advisor's N) was not measured: no timings
    assert "listops: leaderboard" in text and "time N=" not in text
    assert re.search(r"│ sdpa\s+│ [0-9.]+ \(1 seed: no CI\)\s+│ best\s+│ sdpa\s+│", text), text
    md = (out / "report" / "report.md").read_text()
    assert "Advice at N=2k (memory budget 64 MiB)" in md
    assert main(["compare", "--task", "listops", "--mechanisms", "sdpa", "linear", "--out",
                 str(out)]) == 2


def _table_row(text: str, name: str) -> list[str]:
    bar = "┃" if name == "mechanism" else "│"  # rich draws the header row heavy
    line = next(line for line in text.splitlines() if line.startswith(f"{bar} {name}"))
    return [c.strip() for c in line.strip(f"{bar} ").split(bar)]


def test_the_terminal_shows_the_leaderboard_from_the_stored_results(compared, tmp_path,
                                                                     capsys):
    """attnlab report (as attnlab compare, after its run) ends with the leaderboard's first
    columns: the numbers are the results database's, at the advisor's length."""
    out, _ = compared
    db = sqlite3.connect(out / "results.db")
    vals = [v for (v,) in db.execute(
        "SELECT test_value FROM trainings WHERE mechanism='sdpa' ORDER BY seed")]
    t = {n: v for n, v in db.execute(
        "SELECT N, time_s FROM measurements WHERE label='sdpa' AND pass_='fwd'")}
    db.close()
    assert main(["report", str(out), "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    assert "listops: leaderboard, time and memory at N=128" in text
    head = _table_row(text, "mechanism")
    assert head[:4] == ["mechanism", "test accuracy", "vs best", "vs sdpa"]
    assert head[4:] == ["time N=128", "mem N=128"]
    row = dict(zip(head, _table_row(text, "sdpa"), strict=True))
    assert row["test accuracy"].startswith(f"{sum(vals) / 2:.4g} ± ")
    assert row["time N=128"] == format_time(t[128]) and row["mem N=128"].endswith(" MiB")
    other = dict(zip(head, _table_row(text, "sliding_window("), strict=True))  # its label
    assert {row["vs best"], other["vs best"]} & {"best"}
    assert "Welch's t-test" in text
    assert text.rstrip().endswith(f"(Markdown: {tmp_path / 'r' / 'report.md'})")
    # the advisor's length picks the columns; a length not measured shows none
    assert main(["report", str(out), "--out", str(tmp_path / "r"), "--advise", "64"]) == 0
    assert _table_row(capsys.readouterr().out, "mechanism")[4:] == ["time N=64", "mem N=64"]
    assert main(["report", str(out), "--out", str(tmp_path / "r"), "--advise", "4096"]) == 0
    assert len(_table_row(capsys.readouterr().out, "mechanism")) == 4


def test_compare_never_imports_report():
    """compare/ is below report/ (report builds from what compare stored): no import of
    attnlab.report anywhere in it, function-local ones included."""
    import ast
    from pathlib import Path

    import attnlab.compare
    for path in Path(attnlab.compare.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.startswith("attnlab.report")], path
