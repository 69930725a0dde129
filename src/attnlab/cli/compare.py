"""``attnlab compare | report | show-attention``: the whole comparison, its report, one map.

    attnlab compare                                   # the default suite: recall, long recall
    attnlab compare --task listops --mechanisms sdpa linear performer --profile standard
    attnlab report results/compare/suite-quick        # rebuild the report from the results
    attnlab show-attention --checkpoint runs/emotions/sdpa/seed-0 --text "i feel calm"

``compare`` runs the comparison (attnlab.compare: benchmark, then training), then builds
its report (attnlab.report) and ends with the leaderboard's first columns in the terminal.
"""

from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attnlab.bench.analysis import format_length
from attnlab.cli import command_line, plain, positive_int
from attnlab.cli.train import key_value_pairs
from attnlab.compare.plan import PROFILES, make_plan
from attnlab.compare.run import CompareInterrupted, run_compare
from attnlab.compare.suite import (
    DEFAULT_MECHANISMS,
    Suite,
    is_suite,
    make_suite,
    read_suite,
    run_suite,
)
from attnlab.files import writable_dir
from attnlab.report.browser import BrowserNotFound, open_in_browser
from attnlab.report.build import build_report, load_run
from attnlab.report.leaderboard import LEGEND, headline_view, leaderboard, render_leaderboard
from attnlab.report.patterns import plot_attention
from attnlab.report.samples import attention_sample
from attnlab.report.suite import build_suite_report, study_leaderboards
from attnlab.train.config import ConfigError, read_run_config

__all__ = ["add_parsers", "HANDLERS", "leaderboard_tables", "parse_question"]

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
          "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_question(text: str) -> tuple[int, int | None]:
    """``N`` or ``N:BUDGET`` (``4096:512MiB``, ``16384:2GiB``; K/M/G are binary)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*)?", text)
    if not m or (m.group(3) or "").lower() not in _UNITS:
        raise ConfigError(f"--advise: expected N or N:BUDGET such as 4096:512MiB; got {text!r}")
    n = int(m.group(1))
    if n < 1:
        raise ConfigError(f"--advise: N must be >= 1; got {text!r}")
    if m.group(2) is None:
        return n, None
    return n, int(float(m.group(2)) * _UNITS[(m.group(3) or "").lower()])


def _plan_or_suite(args):
    """The default suite (no --task, profile quick), else one task's plan."""
    if args.task is None and (args.regime or args.regime_opt):
        raise ConfigError("--regime: give --task; the default suite trains its studies "
                          "with the standard regime")
    if args.task is None and args.profile == "quick":
        if args.data_dir:
            raise ConfigError("--data-dir: the default suite generates its data; give "
                              "--task for a task that reads files")
        suite = make_suite(profile=args.profile, mechanisms=args.mechanisms,
                           seeds=args.seeds, max_steps=args.max_steps)
        studies = ", ".join(f"{k} ({p.task})" for k, p in suite.studies.items())
        return suite, f"{len(suite.mechanisms)} mechanisms on {studies}", "suite-quick"
    task_kwargs = {"data_dir": args.data_dir} if args.data_dir else {}
    plan = make_plan(task=args.task, profile=args.profile, mechanisms=args.mechanisms,
                     seeds=args.seeds, max_steps=args.max_steps, task_kwargs=task_kwargs,
                     regime=args.regime,
                     regime_kwargs=key_value_pairs(args.regime_opt, "--regime-opt"))
    return plan, f"{len(plan.mechanisms)} mechanisms on {plan.task}", \
        f"{plan.task}-{plan.profile}"


def _run_leaderboard(run_dir: Path) -> tuple[str, list[dict], list[dict]]:
    """``(task, leaderboard rows, bench rows)`` of one compare run, as its report builds
    them (:func:`~attnlab.report.build.build_report`: the fwd+bwd pass when it ran)."""
    plan, _, _, rows, trainings = load_run(run_dir)
    pass_, causal = headline_view(rows)
    return plan.task, leaderboard(rows, trainings, pass_=pass_, causal=causal), rows


def _table(title: str, lb: list[dict], rows: list[dict], n: int | None) -> Table:
    """The leaderboard's first columns: mechanism, test metric, vs best, vs sdpa, and time
    and memory at ``n`` when the sweep measured that length."""
    measured = {r["N"] for r in rows}
    cols, cells = render_leaderboard(lb, [n] if n in measured else [])
    keep = [i for i, c in enumerate(cols) if i < 4 or c.startswith(("time N=", "mem N="))]
    table = Table(title=escape(title), caption=escape(LEGEND), caption_justify="left")
    for i in keep:
        table.add_column(escape(cols[i]), no_wrap=i == 0)
    for row in cells:
        table.add_row(*(escape(row[i]) for i in keep))
    return table


def leaderboard_tables(run_dir: str | Path,
                       advise: list[tuple[int, int | None]] | None = None) -> list[Table]:
    """The terminal's view of a compare run's leaderboard, one table per study of a suite:
    the rows its report shows (built from the stored results by attnlab.report), with time
    and memory at the advisor's length (the first ``advise`` question, else the longest
    length measured) when the sweep measured it."""
    run_dir = Path(run_dir)
    if is_suite(run_dir):
        studies = study_leaderboards(run_dir, read_suite(run_dir).studies)
        boards = {f"{label} ({s['plan'].task})": (s["lb"], s["rows"])
                  for label, s in studies.items()}
    else:
        task, lb, rows = _run_leaderboard(run_dir)
        boards = {task: (lb, rows)}
    tables = []
    for name, (lb, rows) in boards.items():
        n = advise[0][0] if advise else max((r["N"] for r in rows), default=None)
        at = f", time and memory at N={format_length(n)}" if n in {r["N"] for r in rows} \
            else ""
        tables.append(_table(f"{name}: leaderboard{at}", lb, rows, n))
    return tables


def _build(run_dir: Path, out, console: Console, advise) -> dict[str, Path]:
    """Build the report of ``run_dir`` (a suite's or one run's), print the leaderboard
    table(s) and the report's paths; the paths."""
    build = build_suite_report if is_suite(run_dir) else build_report
    paths = build(run_dir, out=out, console=console, advise=advise)
    for table in leaderboard_tables(run_dir, advise):
        console.print(table)
    console.print(f"open {escape(str(paths['html']))}\n"
                  f"(Markdown: {escape(str(paths['markdown']))})")
    return paths


def cmd_compare(args, console: Console) -> int:
    what, title, name = _plan_or_suite(args)
    questions = [parse_question(q) for q in args.advise or []]
    out = Path(args.out or f"results/compare/{name}")
    console.print(f"[bold]attnlab compare[/bold]: {title} (profile {args.profile}) -> {out}")
    run = run_suite if isinstance(what, Suite) else run_compare
    try:
        state = run(what, out, jobs=args.jobs, progress=not args.no_progress,
                    console=console, command=command_line())
    except (CompareInterrupted, KeyboardInterrupt):
        console.print(f"[yellow]interrupted[/yellow]: what finished is stored in {out}; run "
                      f"the same command again to resume")
        return 130
    console.print(f"compared in {state.get('bench_s', 0) + state.get('train_s', 0):.0f} s of "
                  f"benchmark and training")
    _build(out, None, console, questions or None)
    return 0


def cmd_report(args, console: Console) -> int:
    questions = [parse_question(q) for q in args.advise or []]
    paths = _build(Path(args.run_dir), args.out, console, questions or None)
    if args.screenshot:
        try:
            check = open_in_browser(paths["html"], screenshot=args.screenshot)
        except BrowserNotFound as e:
            console.print(f"[red]error:[/red] --screenshot: {e}")
            return 2
        for problem in check.problems:
            console.print(f"[red]browser:[/red] {problem}")
        console.print(f"{len(check.figures)} figures rendered; screenshot {check.screenshot}")
        return 1 if check.problems else 0
    return 0


def _run_dir(checkpoint: str) -> Path:
    p = Path(checkpoint)
    if p.is_file() and p.suffix == ".pt":
        p = p.parent
    if not (p / "config.json").is_file() or not (p / "best.pt").is_file():
        raise ConfigError(f"--checkpoint: expected a training run directory (config.json and "
                          f"best.pt) or its best.pt; got {checkpoint!r}")
    return p


def cmd_show_attention(args, console: Console) -> int:
    run = _run_dir(args.checkpoint)
    out = Path(args.out or (run / "attention.png"))
    # before the model is loaded and run: a read-only destination is said at once
    writable_dir(out.parent, "--out" if args.out else "show-attention",
                 hint="" if args.out else "pass --out to write the map elsewhere")
    cfg = read_run_config(run)
    s = attention_sample(run, text=args.text)
    layers = s["layers"]
    if not -len(layers) <= args.layer < len(layers):
        raise ConfigError(f"--layer must be in [{-len(layers)}, {len(layers) - 1}]; "
                          f"got {args.layer}")
    if s["prediction"] is not None:
        console.print(f"prediction: {s['prediction']}")
    title = f"{cfg.task} / {cfg.mechanism}: layer {args.layer % len(layers)}"
    if s["prediction"] is not None:
        title += f", predicted {s['prediction']}"
    paths = plot_attention(s["tokens"], layers[args.layer], out, title=title)
    console.print("wrote " + ", ".join(map(str, paths)))
    return 0


_ADVISE = ("an advisor question N[:BUDGET], e.g. 8192:512MiB (repeatable; default: the "
           "longest measured N, and for one task also 4x it within 1 GiB)")


def add_parsers(sub) -> None:
    pc = sub.add_parser("compare", help="the main job: benchmark and train every mechanism, "
                                        "then write the report", description=plain(__doc__))
    pc.add_argument("--mechanisms", nargs="+",
                    help=f"names (default: {' '.join(DEFAULT_MECHANISMS)} in the default "
                         f"suite, every registered one with --task or another --profile)")
    pc.add_argument("--task", help="a task of attnlab tasks (default: the suite of recall and "
                                   "long-range recall studies, generated)")
    pc.add_argument("--profile", default="quick", help=" | ".join(PROFILES))
    pc.add_argument("--out", help="run directory (default results/compare/TASK-PROFILE); "
                                  "an unfinished one is resumed")
    pc.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the "
                                                         "profile's)")
    pc.add_argument("--max-steps", type=int, help="training steps per run (default: the "
                                                  "profile's)")
    pc.add_argument("--jobs", type=positive_int, help="training runs at a time (default: the "
                                                      "number of cores)")
    pc.add_argument("--data-dir", help="dataset files, for a --task that reads them")
    pc.add_argument("--regime", help="training regime of every run (attnlab tasks lists "
                                     "them; default: standard)")
    pc.add_argument("--regime-opt", action="append", metavar="KEY=VALUE",
                    help="an option of --regime (repeatable)")
    pc.add_argument("--advise", action="append", metavar="N[:BUDGET]", help=_ADVISE)
    pc.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr = sub.add_parser("report", help="rebuild a compare run's report from its stored "
                                       "results")
    pr.add_argument("run_dir", help="the --out directory of attnlab compare")
    pr.add_argument("--out", help="directory (default RUN_DIR/report)")
    pr.add_argument("--advise", action="append", metavar="N[:BUDGET]", help=_ADVISE)
    pr.add_argument("--screenshot", metavar="PNG", help="open the report in headless "
                    "chromium: report console errors, network requests and empty figures, "
                    "save a full-page screenshot")
    ps = sub.add_parser("show-attention", help="attention map (PNG and SVG) of a trained "
                                               "model on one input")
    ps.add_argument("--checkpoint", required=True, help="a run directory or its best.pt")
    ps.add_argument("--text", help="the input (text tasks; image tasks use a test image)")
    ps.add_argument("--layer", type=int, default=-1, help="which layer; -1 is the last")
    ps.add_argument("--out", help="PNG path (default RUN/attention.png; an SVG too)")


HANDLERS = {"compare": cmd_compare, "report": cmd_report, "show-attention": cmd_show_attention}
