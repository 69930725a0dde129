"""``attnlab bench generate``: tokens/s and memory of decoding after long prompts.

    attnlab bench generate --mechanisms sdpa linear sliding_window:window=256 \\
        --prompts 1024 4096 16384 --new-tokens 256

Each (mechanism, prompt) point runs in its own process (:mod:`attnlab.bench.generation`);
rows go to the results database's ``generations`` table and are printed as a table
(``--markdown`` for docs). ``attnlab bench generations`` prints what is stored.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from attnlab.bench.analysis import format_bytes
from attnlab.bench.generation import run_generation
from attnlab.bench.store import Store
from attnlab.util.progress import make_progress

__all__ = ["add_parsers", "cmd_generate", "cmd_generations", "generation_rows"]

_HEAD = ("mechanism", "decodes with", "prompt", "tokens/s", "ms/token first -> last quarter",
         "cache", "decode peak RSS", "prefill")


def add_parsers(bsub, mechanism_type) -> list:
    """The two subcommands; returns their parsers (for the shared ``--db`` option)."""
    pg = bsub.add_parser("generate", help="tokens/s and memory of decoding after long "
                                          "prompts: KV cache vs bounded state")
    pg.add_argument("--mechanisms", nargs="+", type=mechanism_type,
                    default=["sdpa", "linear", "sliding_window"],
                    help="name or name:key=value,... (default: sdpa linear sliding_window)")
    pg.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096, 16384],
                    help="prompt lengths (default: 1024 4096 16384)")
    pg.add_argument("--new-tokens", type=int, default=256, help="tokens decoded (256)")
    pg.add_argument("--embed-dim", type=int, default=512, help="layer width (512)")
    pg.add_argument("--heads", type=int, default=8, help="heads (8)")
    pg.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    pg.add_argument("--timeout", type=float, default=600.0, help="seconds per point (600)")
    pg.add_argument("--markdown", action="store_true", help="a Markdown table (for docs)")
    pg.add_argument("--no-progress", action="store_true", help="no progress bar")
    ps = bsub.add_parser("generations", help="the stored generation measurements")
    ps.add_argument("--markdown", action="store_true", help="a Markdown table (for docs)")
    return [pg, ps]


def generation_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    """The printed cells of each row (``_HEAD``'s columns)."""
    out = []
    for r in rows:
        label = r["mechanism"] + "".join(f" {k}={v}" for k, v in r["hparams"].items())
        how = {"kv_cache": "KV cache", "state": "state"}.get(r["kind"], str(r["kind"]))
        if r["status"] != "ok":
            out.append((label, how, str(r["prompt_len"]), r["status"], r["message"] or "",
                        "-", "-", "-"))
            continue
        out.append((label, how, str(r["prompt_len"]), f"{r['tokens_per_s']:.1f}",
                    f"{r['first_ms']:.2f} -> {r['last_ms']:.2f}",
                    format_bytes(r["cache_bytes"]), format_bytes(r["peak_decode_bytes"]),
                    f"{r['prefill_s']:.2f} s"))
    return out


def _print(rows: list[dict], console: Console, markdown: bool) -> None:
    cells = generation_rows(rows)
    if markdown:
        print("| " + " | ".join(_HEAD) + " |\n|" + "---|" * len(_HEAD))
        for c in cells:
            print("| " + " | ".join(c) + " |")
        return
    table = Table(title="decoding after a prompt (one attention layer, batch 1, float32)")
    for h in _HEAD:
        table.add_column(h)
    for c in cells:
        table.add_row(*c)
    console.print(table)


def cmd_generate(args, console: Console, db: str) -> int:
    with Store(db) as store:
        progress = make_progress(console=console, enabled=not args.no_progress)
        with progress:
            rows = run_generation(args.mechanisms, args.prompts, new_tokens=args.new_tokens,
                                  embed_dim=args.embed_dim, num_heads=args.heads,
                                  threads=args.threads, timeout_s=args.timeout, store=store,
                                  progress=progress)
    _print(rows, console, args.markdown)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def cmd_generations(args, console: Console, db: str) -> int:
    with Store(db, create=False) as store:
        rows = store.generations()
    if not rows:
        console.print(f"no generation measurements in {db}: run attnlab bench generate")
        return 1
    _print(rows, console, args.markdown)
    return 0
