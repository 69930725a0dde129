"""``attnlab`` command line: ``list``, ``info NAME``, ``verify``, ``demo``, ``bench ...``,
``tasks``, ``train``, ``generate``, ``inpaint``."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from attnlab import __version__
from attnlab.cli import bench, positive_int
from attnlab.cli import compare as compare_cli
from attnlab.cli import train as train_cli
from attnlab.cli.errors import report_error, take_debug_flag
from attnlab.registry import get, list_mechanisms


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    names = list_mechanisms(family=args.family)
    if args.json:
        print(json.dumps([get(n).to_dict() for n in names], indent=2))
        return 0
    table = Table(title=f"attnlab {__version__}: {len(names)} mechanisms", show_lines=False)
    table.add_column("name", no_wrap=True)  # names are copied into code: never fold them
    for col in ("family", "exact", "time", "memory", "causal", "masks", "cross",
                "weights", "kv cache", "paper"):
        table.add_column(col, overflow="fold")
    for n in names:
        s = get(n)
        # "padding": key-padding masks only (no arbitrary (Nq, Nk) mask).
        masks = "yes" if s.arbitrary_mask else ("padding" if s.key_padding else "-")
        table.add_row(n, s.family, "exact" if s.exact else "approx", s.time, s.memory,
                      _yes(s.causal), masks, _yes(s.cross), _yes(s.returns_weights),
                      _yes(s.kv_cache), s.paper.short())
    console.print(table)
    return 0


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    s = get(args.name)
    if args.json:
        print(json.dumps(s.to_dict(), indent=2))
        return 0
    console.print(f"[bold]{s.name}[/bold]  ({s.family}, {'exact' if s.exact else 'approximate'})")
    if s.aliases:
        console.print(f"aliases: {', '.join(s.aliases)}")
    console.print(s.summary)
    console.print(f"\n[bold]equation[/bold]  {s.equation}")
    console.print(f"[bold]time[/bold] {s.time}   [bold]memory[/bold] {s.memory}")
    flags = {"causal": s.causal, "arbitrary masks": s.arbitrary_mask,
             "key padding": s.key_padding, "cross (Nq != Nk)": s.cross,
             "returns weights": s.returns_weights, "kv cache": s.kv_cache,
             "differentiable": s.differentiable, "float16/bfloat16": s.half_precision,
             "learnable parameters": s.learnable}
    console.print("  ".join(f"{k}: {_yes(v)}" for k, v in flags.items()))
    console.print(f"\n[bold]paper[/bold]  {s.paper.authors} ({s.paper.year}). "
                  f"{s.paper.title}. {s.paper.url}")
    table = Table(title="hyperparameters")
    for col in ("name", "type", "default", "description"):
        table.add_column(col)
    for h in s.hparams:
        table.add_row(h.name, h.type.__name__, h.describe_default(), h.doc)
    if s.hparams:
        console.print(table)
    else:
        console.print("hyperparameters: none")
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from attnlab.cli.demo import run_demo

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
    import torch

    from attnlab.verify import verify

    names = args.names or list_mechanisms()
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
        ref = "softmax" if spec.limit.reference is None else "own formula (float64)"
        table.add_row(spec.name, r.note, ref, f"{r.error:.1e}", f"{r.tol:.0e}",
                      "[green]ok[/green]" if r.ok else f"[red]FAILED[/red] {r.message}")
    console.print(table)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlab", description=__doc__)
    p.add_argument("--version", action="version", version=f"attnlab {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="on an error, print the traceback too (accepted anywhere)")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("list", help="table of registered mechanisms")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument("--family", default=None, help="only this family")
    pi = sub.add_parser("info", help="hyperparameters, equation and paper of one mechanism")
    pi.add_argument("name")
    pi.add_argument("--json", action="store_true")
    pv = sub.add_parser("verify", help="check mechanisms in their limit cases (the gate)")
    pv.add_argument("names", nargs="*", help="mechanisms (default: all)")
    pv.add_argument("--n", type=positive_int, default=64, help="sequence length")
    pv.add_argument("--head-dim", type=positive_int, default=16)
    pv.add_argument("--dtype", default="float32",
                    choices=("float32", "float64", "float16", "bfloat16"))
    pv.add_argument("--causal", action="store_true")
    pd = sub.add_parser("demo", help="run every mechanism once and print a table")
    pd.add_argument("--n", type=positive_int, default=256, help="sequence length")
    pd.add_argument("--batch", type=positive_int, default=2)
    pd.add_argument("--heads", type=positive_int, default=4)
    pd.add_argument("--head-dim", type=positive_int, default=32)
    pd.add_argument("--causal", action="store_true")
    pd.add_argument("--mechanisms", nargs="+", default=None)
    pd.add_argument("--json", action="store_true")
    bench.add_parser(sub)
    train_cli.add_parsers(sub)
    compare_cli.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv, debug = take_debug_flag(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(bench.normalise_argv(argv))
    # Piped output (CI logs, files) gets a wide table instead of rich's 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    handlers = {"list": cmd_list, "info": cmd_info, "verify": cmd_verify, "demo": cmd_demo,
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
