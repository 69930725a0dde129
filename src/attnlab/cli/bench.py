"""``attnlab bench``: run a sweep, list runs, show, export, compare and plot them.

    attnlab bench --profile quick                   # run (the default subcommand)
    attnlab bench run --mechanisms sdpa sliding_window:window=128 --n 1024 4096 --pass both
    attnlab bench runs | show RUN | export RUN --format csv | compare A B | plot RUN
    attnlab bench generate --prompts 1024 4096 16384   # decoding: KV cache vs state
    attnlab bench ring --procs 1 2 4 --n 4096 --causal  # ring attention over P processes
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from attnlab.bench.analysis import (
    compare_runs,
    describe_crossover,
    format_bytes,
    format_length,
    format_time,
    render_compare,
    render_table,
    row_hparams,
    status_word,
    summarise,
)
from attnlab.bench.grid import grid_from_file, make_grid
from attnlab.bench.plots import plot_run
from attnlab.bench.runner import run_sweep
from attnlab.bench.store import Store
from attnlab.cli import bench_generate, bench_ring, command_line, plain
from attnlab.files import atomic_path, write_text_atomic

SUBCOMMANDS = ("run", "runs", "show", "export", "compare", "plot", "generate", "generations",
               "ring")
DEFAULT_DB = "results/bench.db"


def _db_path(args) -> str:
    return args.db or os.environ.get("ATTNLAB_DB") or DEFAULT_DB


def _mechanism(text: str):
    """``name`` or ``name:key=value,key=value`` (values parsed as JSON when they can be);
    a peer is ``peer:NAME[:key=value,...]``."""
    prefix = ""
    if text.startswith("peer:"):
        prefix, text = "peer:", text[len("peer:"):]
    if ":" not in text:
        return prefix + text
    name, _, rest = text.partition(":")
    name = prefix + name
    hp = {}
    for item in filter(None, rest.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--mechanisms: expected name:key=value[,key=value]; got {text!r}")
        try:
            hp[key] = json.loads(raw)
        except json.JSONDecodeError:
            hp[key] = raw
    return {"name": name, **hp}


def add_parser(sub) -> None:
    pb = sub.add_parser("bench", help="benchmark lab: time, memory, FLOPs and scaling of the "
                                      "mechanisms, stored in SQLite", description=plain(__doc__))
    bsub = pb.add_subparsers(dest="bench_command", required=True, title="subcommands",
                             metavar="SUBCOMMAND",
                             help="attnlab bench SUBCOMMAND --help: its options")
    pr = bsub.add_parser("run", help="measure a grid (resumes an unfinished identical run)")
    profile = "(default: the profile's, else %s)"
    pr.add_argument("--profile", help="quick | standard | long (default: quick, unless --n "
                                      "or --sweep gives the grid)")
    pr.add_argument("--sweep", help="a .toml or .yaml sweep file (flags given here override it)")
    pr.add_argument("--mechanisms", nargs="+",
                    help="names, name:key=value,..., 'all', 'approximate' or 'subquadratic' "
                         + profile % "all")
    pr.add_argument("--n", dest="lengths", type=int, nargs="+",
                    help="sequence lengths (default: the profile's)")
    pr.add_argument("--batch", type=int, nargs="+", help="batch sizes " + profile % 1)
    pr.add_argument("--heads", type=int, nargs="+", help="head counts " + profile % 8)
    pr.add_argument("--head-dim", dest="head_dim", type=int, nargs="+",
                    help="head dimensions " + profile % 64)
    pr.add_argument("--dtype", dest="dtypes", nargs="+",
                    help="float32, float16, bfloat16, ... " + profile % "float32")
    pr.add_argument("--pass", dest="passes", choices=("fwd", "fwd+bwd", "both"),
                    help="forward only, forward and backward, or both " + profile % "fwd")
    pr.add_argument("--causal", choices=("no", "yes", "both"),
                    help="causal attention " + profile % "no")
    pr.add_argument("--device", choices=("cpu", "cuda"), help="where to run (default: cpu)")
    pr.add_argument("--threads", type=int, help="torch threads of a measurement (default: 2)")
    pr.add_argument("--min-run-time", dest="min_run_time", type=float,
                    help="seconds of repeats per point " + profile % 0.3)
    pr.add_argument("--timeout", dest="timeout_s", type=float,
                    help="seconds per point before it counts as a timeout " + profile % 300)
    pr.add_argument("--mem-cap-gib", dest="mem_cap_gib", type=float,
                    help="memory limit of a measurement, GiB (default: 90%% of the RAM)")
    pr.add_argument("--new", action="store_true", help="start a new run, do not resume")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--plot", metavar="DIR", help="also write the plots here")
    pl = bsub.add_parser("runs", help="list the runs in the database")
    ps = bsub.add_parser("show", help="the table of one run")
    ps.add_argument("run", nargs="?", default="latest", help="run id")
    ps.add_argument("--markdown", action="store_true", help="a Markdown table (for docs)")
    pe = bsub.add_parser("export", help="measurements as CSV, JSON or Parquet")
    pe.add_argument("run", nargs="?", default="latest", help="run id")
    pe.add_argument("--format", default="csv", choices=("csv", "json", "parquet"),
                    help="file format")
    pe.add_argument("--out", help="file (default: stdout; parquet needs one)")
    pc = bsub.add_parser("compare", help="time and memory ratios of run B over run A")
    pc.add_argument("run_a", help="run id of the baseline")
    pc.add_argument("run_b", help="run id compared with it")
    pp = bsub.add_parser("plot", help="PNG and SVG plots of a run")
    pp.add_argument("run", nargs="?", default="latest", help="run id")
    pp.add_argument("--out", help="directory (default results/plots/run-ID)")
    gen = bench_generate.add_parsers(bsub, _mechanism)
    bench_ring.add_parser(bsub)
    for p in (pr, pl, ps, pe, pc, pp, *gen):
        p.add_argument("--db", help=f"results database (default $ATTNLAB_DB or {DEFAULT_DB})")


def normalise_argv(argv: list[str]) -> list[str]:
    """``attnlab bench --profile quick`` means ``attnlab bench run --profile quick``."""
    if argv and argv[0] == "bench":
        rest = argv[1:]
        if not rest or (rest[0].startswith("-") and rest[0] not in ("-h", "--help")):
            return ["bench", "run", *rest]
    return argv


def _grid(args):
    given = {k: getattr(args, k) for k in ("lengths", "batch", "heads", "head_dim", "dtypes",
                                            "device", "threads", "min_run_time", "timeout_s",
                                            "mem_cap_gib")}
    if args.mechanisms is not None:
        given["mechanisms"] = [_mechanism(m) for m in args.mechanisms]
        if len(given["mechanisms"]) == 1 and isinstance(given["mechanisms"][0], str):
            given["mechanisms"] = given["mechanisms"][0]  # "all", "approximate+sdpa"
    if args.passes is not None:
        given["passes"] = ["fwd", "fwd+bwd"] if args.passes == "both" else [args.passes]
    if args.causal is not None:
        given["causal"] = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    if args.sweep:
        return grid_from_file(args.sweep, profile=args.profile, **given)
    if args.profile is None and args.lengths is None:
        args.profile = "quick"
    return make_grid(profile=args.profile, **given)


def cmd_run(args, console: Console) -> int:
    grid = _grid(args)  # every error before the database is opened
    with Store(_db_path(args)) as store:
        points = len(grid.points())
        console.print(f"[bold]attnlab bench[/bold]: {points} points -> {store.path}")
        try:
            run_id = run_sweep(grid, store, command=command_line(), resume=not args.new,
                               progress=not args.no_progress, console=console)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]: run the same command again to resume")
            return 130
        _show(store, run_id, console)
        if args.plot:
            _plot(store, run_id, args.plot, console)
    return 0


def markdown_table(summary: list[dict]) -> str:
    """The run's table as Markdown (for docs): the hyperparameters each row ran with (as
    built), time per N, peak memory at the longest length, fitted exponents, crossover
    against sdpa, max error; statuses in words."""
    lengths = sorted({n for e in summary for n in (*dict(e["time"]), *dict(e["status"]))})
    head = (["mechanism", "pass", "hparams (as built)"] + [format_length(n) for n in lengths]
            + [f"mem @ {format_length(lengths[-1])}", "time ~ N^a", "mem ~ N^a",
               "crossover vs sdpa", "max error"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(e, key, n, fmt):
        value, status = dict(e[key]).get(n), dict(e["status"]).get(n)
        return fmt(value) if value is not None else (status_word(status) if status else "")

    for e in summary:
        exps = [f"{x:.2f}" if x is not None else "-"
                for x in (e["time_exponent"], e["memory_exponent"])]
        err = "-" if e["max_error"] is None else f"{e['max_error']:.1e}"
        hp = row_hparams(e).replace("|", "\\|")  # a '|' would split the Markdown cell
        cells = ([f"`{e['label']}`", e["pass_"] + (" causal" if e["causal"] else ""), hp]
                 + [cell(e, "time", n, format_time) for n in lengths]
                 + [cell(e, "memory", lengths[-1], format_bytes), *exps,
                    describe_crossover(e), err])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _show(store, run_id, console: Console, markdown: bool = False) -> None:
    run = store.run(run_id)
    rows = store.measurements(run_id)
    m = run["machine"]
    if markdown:
        print(markdown_table(summarise(rows)))
        return
    console.print(render_table(summarise(rows)))
    console.print(f"run {run['id']} ({run['status']}): {m['cpu']}, {m['cores']} cores, "
                  f"{roof_text(m)}, torch {run['versions']['torch']}, commit "
                  f"{run['git_commit']}")


def roof_text(machine: dict) -> str:
    """``roof 182 GFLOP/s (best of start 175, end 182)``: the run's roof and its samples
    (a run from before the roof was sampled twice has only the one)."""
    roof = machine.get("roof_gflops")
    if not isinstance(roof, (int, float)):
        return "roof not measured"
    start, end = machine.get("roof_start_gflops"), machine.get("roof_end_gflops")
    samples = [f"{w} {v:.0f}" for w, v in (("start", start), ("end", end)) if v is not None]
    resumes = sum(1 for s in machine.get("roof_samples_gflops") or [] if s[0] == "resume")
    if resumes:
        samples.append(f"{resumes} resume{'s' if resumes > 1 else ''}")
    return f"roof {roof:.0f} GFLOP/s" + (f" (best of {', '.join(samples)})" if samples else "")


def _plot(store, run_id, out, console: Console) -> None:
    rid = store.resolve(run_id)
    out = Path(out or f"results/plots/run-{rid}")
    try:
        paths = plot_run(store.measurements(rid), store.run(rid), out)
    except OSError as e:  # name the directory asked for, not just the first file that failed
        raise _cannot_write(e, out, "the plots") from e
    console.print(f"{len(paths)} plot files in {out}")


def _cannot_write(e: OSError, out: Path, what: str) -> OSError:
    """``e`` as an OSError about ``out`` (the user's --out) that says what was not written
    and which file failed (a temporary file's name means nothing to the user)."""
    failed = Path(e.filename) if e.filename is not None else out
    detail = e.strerror or str(e)
    if failed != out and not failed.name.startswith(f".{out.name}."):  # not our temp file
        detail = f"{failed}: {detail}"
    return OSError(e.errno, f"cannot write {what} there ({detail}); pass another --out",
                   str(out))


def cmd_runs(args, console: Console) -> int:
    with Store(_db_path(args), readonly=True) as store:
        t = Table(title=f"runs in {store.path}")
        for c in ("id", "started", "status", "profile", "points", "ok", "commit", "command"):
            t.add_column(c)
        for r in store.runs():
            t.add_row(str(r["id"]), r["started_at"], r["status"], r["profile"] or "-",
                      f"{r['done']}/{r['points_total']}", str(r["ok"]),
                      (r["git_commit"] or "-")[:12], r["command"] or "")
        console.print(t)
    return 0


def cmd_show(args, console: Console) -> int:
    with Store(_db_path(args), readonly=True) as store:
        _show(store, store.resolve(args.run), console, markdown=args.markdown)
    return 0


def cmd_export(args, console: Console) -> int:
    with Store(_db_path(args), readonly=True) as store:
        rid = store.resolve(args.run)
        rows = store.measurements(rid)
    for r in rows:  # one JSON text per cell: CSV and Parquet hold no nested values
        r["hparams"] = json.dumps(r["hparams"], sort_keys=True)
        if r["effective_hparams"] is not None:
            r["effective_hparams"] = json.dumps(r["effective_hparams"], sort_keys=True)
    out = Path(args.out) if args.out else None
    if args.format == "parquet":
        if out is None:
            raise ValueError("export --format parquet needs --out FILE (binary output)")
        try:
            import pandas as pd

            with atomic_path(out) as tmp:  # no parquet engine: ImportError
                pd.DataFrame(rows).to_parquet(tmp)
        except ImportError as e:
            raise ValueError(f"export --format parquet needs pandas and pyarrow: pip install "
                             f"pandas pyarrow ({e})") from None
        except OSError as e:
            raise _cannot_write(e, out, "the export") from e
        console.print(f"{len(rows)} measurements -> {out}")
        return 0
    buf = io.StringIO()
    if args.format == "json":
        json.dump(rows, buf, indent=1)
        buf.write("\n")
    else:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["run_id"])
        w.writeheader()
        w.writerows(rows)
    if out is not None:
        try:
            write_text_atomic(out, buf.getvalue())
        except OSError as e:
            raise _cannot_write(e, out, "the export") from e
        console.print(f"{len(rows)} measurements -> {out}")
    else:
        sys.stdout.write(buf.getvalue())
    return 0


def cmd_compare(args, console: Console) -> int:
    with Store(_db_path(args), readonly=True) as store:
        a, b = store.measurements(args.run_a), store.measurements(args.run_b)
    console.print(render_compare(compare_runs(a, b)))
    return 0


def cmd_plot(args, console: Console) -> int:
    with Store(_db_path(args), readonly=True) as store:
        _plot(store, args.run, args.out, console)
    return 0


def run(args, console: Console) -> int:
    handlers = {"run": cmd_run, "runs": cmd_runs, "show": cmd_show, "export": cmd_export,
                "compare": cmd_compare, "plot": cmd_plot}
    if args.bench_command == "generate":
        return bench_generate.cmd_generate(args, console, _db_path(args))
    if args.bench_command == "generations":
        return bench_generate.cmd_generations(args, console, _db_path(args))
    if args.bench_command == "ring":
        return bench_ring.cmd_ring(args, console)
    return handlers[args.bench_command](args, console)
