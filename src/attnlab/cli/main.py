"""The ``attnlab`` command: every subcommand's parser and handler, one error line on failure."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from rich.console import Console
from rich.table import Table

from attnlab import __version__
from attnlab.cli import Parser, bench, info, positive_int
from attnlab.cli import compare as compare_cli
from attnlab.cli import train as train_cli
from attnlab.cli.demo import run_demo
from attnlab.cli.errors import report_error, take_debug_flag
from attnlab.registry import get, list_mechanisms
from attnlab.verify import verify

DESCRIPTION = """attnlab: a lab for attention mechanisms. Implement, verify, benchmark,
train and compare them: each command below says what it does, COMMAND --help how."""

EPILOG = """start here:
  attnlab list                      every registered mechanism, one line each
  attnlab info sdpa                 one of them: equation, paper, its file, tests, bench
  attnlab verify                    each one in its limit case against its reference
  attnlab compare                   the main job: benchmark, train, write the report
  attnlab bench --profile quick     time and memory of every mechanism (< 3 min)

on an error a command prints one line and exits 2 (your input) or 1 (a defect of
attnlab); --debug, anywhere on the line, adds the traceback (or ATTNLAB_DEBUG=1)."""


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    if args.seed_names:
        console.print(info.seed_names_table())
        return 0
    names = list_mechanisms(family=args.family, inputs=None)
    if args.json:
        print(json.dumps([get(n).to_dict() for n in names], indent=2))
        return 0
    table = Table(title=f"attnlab {__version__}: {len(names)} mechanisms", show_lines=False)
    table.add_column("name", no_wrap=True)  # names are copied into code: never fold them
    for col in ("family", "inputs", "exact", "time", "memory", "causal", "masks", "cross",
                "weights", "kv cache", "paper"):
        table.add_column(col, overflow="fold")
    for n in names:
        s = get(n)
        # "padding": key-padding masks only (no arbitrary (Nq, Nk) mask).
        masks = "yes" if s.arbitrary_mask else ("padding" if s.key_padding else "-")
        table.add_row(n, s.family, s.inputs, "exact" if s.exact else "approx", s.time, s.memory,
                      _yes(s.causal), masks, _yes(s.cross), _yes(s.returns_weights),
                      _yes(s.kv_cache), s.paper.short())
    console.print(table)
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    rows = run_demo(batch=args.batch, heads=args.heads, n=args.n, head_dim=args.head_dim,
                    causal=args.causal, names=args.mechanisms)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0 if all(not r.error for r in rows) else 1
    table = Table(title=f"every mechanism once: B={args.batch} H={args.heads} N={args.n} "
                        f"D={args.head_dim}{' causal' if args.causal else ''} (smoke run, "
                        f"not a benchmark)")
    for col in ("mechanism", "family", "params", "fwd ms", "bwd ms",
                "max |err| vs exact", "status"):
        table.add_column(col)
    for r in rows:
        err = "n/a (own score)" if r.max_abs_err is None else f"{r.max_abs_err:.1e}"
        if r.max_abs_err is not None and not r.exact:
            err += " (approx.)"
        status = r.error or ("ok" if r.finite else "NON-FINITE")
        table.add_row(r.name, r.family, str(r.params), f"{r.forward_ms:.1f}",
                      f"{r.backward_ms:.1f}", err, status)
    console.print(table)
    return 0 if all(not r.error and r.finite for r in rows) else 1


def cmd_verify(args: argparse.Namespace, console: Console) -> int:
    names = args.names or list_mechanisms(inputs=None)
    dtype = getattr(torch, args.dtype)
    table = Table(title=f"every mechanism in its limit case vs its reference: N={args.n} "
                        f"D={args.head_dim} {args.dtype}{' causal' if args.causal else ''}")
    for col in ("mechanism", "limit case", "compared with", "error", "tol", "result"):
        table.add_column(col, overflow="fold")
    failed = 0
    for name in names:
        spec = get(name)
        if args.causal and not spec.causal:
            table.add_row(spec.name, "-", "-", "-", "-", "no causal form")
            continue
        if dtype in (torch.float16, torch.bfloat16) and not spec.half_precision:
            table.add_row(spec.name, "-", "-", "-", "-", f"no {args.dtype}")
            continue
        r = verify(spec.name, n=args.n, head_dim=args.head_dim, dtype=dtype, causal=args.causal)
        failed += not r.ok
        ref = ("own check (float64)" if spec.limit.gate is not None else
               "softmax" if spec.limit.reference is None else "own formula (float64)")
        table.add_row(spec.name, r.note, ref, f"{r.error:.1e}", f"{r.tol:.0e}",
                      "[green]ok[/green]" if r.ok else f"[red]FAILED[/red] {r.message}")
    console.print(table)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="attnlab", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"attnlab {__version__}",
                   help="print the version and exit")
    p.add_argument("--debug", action="store_true",
                   help="on an error, print the traceback too (accepted anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND",
                           help="attnlab COMMAND --help: its options")
    pl = sub.add_parser("list", help="table of every registered mechanism: family, "
                                     "complexity, flags, paper")
    pl.add_argument("--json", action="store_true", help="the registry as JSON")
    pl.add_argument("--family", help="only this family (exact, classic, sparse, ...)")
    pl.add_argument("--seed-names", action="store_true",
                    help="the 23 names of the project attnlab replaces, and what implements "
                         "each (attnlab info NAME takes them too)")
    info.add_parser(sub)
    pv = sub.add_parser("verify", help="check every mechanism in its limit case against its "
                                       "reference (the correctness gate)")
    pv.add_argument("names", nargs="*", help="mechanisms (default: all)")
    pv.add_argument("--n", type=positive_int, default=64, help="sequence length")
    pv.add_argument("--head-dim", type=positive_int, default=16, help="head dimension")
    pv.add_argument("--dtype", default="float32", help="floating point type of the inputs",
                    choices=("float32", "float64", "float16", "bfloat16"))
    pv.add_argument("--causal", action="store_true", help="check the causal forms")
    pd = sub.add_parser("demo", help="run every mechanism once on one input and print a table "
                                     "(a smoke run, not a benchmark)")
    pd.add_argument("--n", type=positive_int, default=256, help="sequence length")
    pd.add_argument("--batch", type=positive_int, default=2, help="batch size")
    pd.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    pd.add_argument("--head-dim", type=positive_int, default=32, help="head dimension")
    pd.add_argument("--causal", action="store_true", help="causal attention")
    pd.add_argument("--mechanisms", nargs="+", help="only these (default: all)")
    pd.add_argument("--json", action="store_true", help="the rows as JSON")
    bench.add_parser(sub)
    train_cli.add_parsers(sub)
    compare_cli.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv, debug = take_debug_flag(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(bench.normalise_argv(argv))
    # Piped output (CI logs, files) gets a wide table instead of rich's 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    handlers = {"list": cmd_list, "info": info.cmd_info, "verify": cmd_verify, "demo": cmd_demo,
                "bench": bench.run, **train_cli.HANDLERS, **compare_cli.HANDLERS}
    try:
        return handlers[args.command](args, console)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/yellow]")
        return 130
    except Exception as e:  # every error ends in one line naming what is wrong
        return report_error(e, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
