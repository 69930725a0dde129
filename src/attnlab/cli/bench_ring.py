"""``attnlab bench ring``: ring attention over P local processes, each timing its rank.

    attnlab bench ring --procs 1 2 4 --n 4096 8192 --layouts zigzag striped contiguous \\
        --passes fwd fwd+bwd --causal

Each point launches P processes (a loopback process group: gloo on CPU, nccl with
``--device cuda``, one GPU per rank) and reports per rank: time (mean, and max/min across
ranks), compute max/min (the layout's balance), the share of time spent waiting on
transfers, peak memory per process (CPU: peak RSS above the call's start, mmap threshold
pinned so it follows the tensors; CUDA: the allocator's peak). Every process runs
``--threads`` torch threads (1 by default: P processes share the cores). Rows are printed
(``--markdown`` for docs) and written as JSON with ``--json FILE``: the results database
has no columns for per-rank times, balance or communication (see :mod:`attnlab.bench.ring`).
"""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from attnlab.bench.ring import MARKDOWN_HEAD, markdown_table, run_ring_bench, table_cells
from attnlab.files import write_text_atomic
from attnlab.mechanisms.ring import LAYOUTS
from attnlab.util.checks import check_int
from attnlab.util.progress import make_progress

__all__ = ["add_parser", "cmd_ring"]


def add_parser(bsub):
    pr = bsub.add_parser("ring", help="ring attention over P local processes: time per rank, "
                                      "balance, communication share, memory per process")
    pr.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4],
                    help="process counts P (default: 1 2 4)")
    pr.add_argument("--n", dest="lengths", type=int, nargs="+", default=[4096],
                    help="total sequence lengths N, over all ranks (default: 4096)")
    pr.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                    help="how the sequence is cut over ranks (default: all three)")
    pr.add_argument("--passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd"],
                    help="forward only and/or forward and backward (default: fwd)")
    pr.add_argument("--causal", nargs="?", const="yes", default="no",
                    choices=("no", "yes", "both"),
                    help="causal attention: bare --causal means yes (default: no)")
    pr.add_argument("--batch", type=int, default=1, help="batch size (1)")
    pr.add_argument("--heads", type=int, default=4, help="heads (4)")
    pr.add_argument("--head-dim", dest="head_dim", type=int, default=64, help="head dim (64)")
    pr.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16",
                                                           "bfloat16"), help="float32")
    pr.add_argument("--block-size", dest="block_size", type=int, default=256,
                    help="rows per tile (256)")
    pr.add_argument("--repeats", type=int, default=3, help="timed calls per point (3)")
    pr.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    pr.add_argument("--threads", type=int, default=1, help="torch threads per process (1)")
    pr.add_argument("--timeout", dest="timeout_s", type=float, default=600.0,
                    help="seconds per point before its processes are killed (600)")
    pr.add_argument("--json", dest="json_out", metavar="FILE", help="also write the rows here")
    pr.add_argument("--markdown", action="store_true", help="a Markdown table (for docs)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    return pr


def cmd_ring(args, console: Console) -> int:
    for name in ("batch", "heads", "head_dim", "block_size", "repeats", "threads"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), low=1)
    for name, values in (("--procs", args.procs), ("--n", args.lengths)):
        for value in values:
            check_int(name, value, low=1)
    causal = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    with make_progress(console=console, enabled=not args.no_progress) as progress:
        rows = run_ring_bench(args.procs, args.lengths, args.layouts, args.passes, causal,
                              threads=args.threads, timeout_s=args.timeout_s,
                              progress=progress, batch=args.batch, heads=args.heads,
                              head_dim=args.head_dim, dtype=args.dtype,
                              block_size=args.block_size, repeats=args.repeats,
                              device=args.device)
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        print(markdown_table(rows))
    else:
        table = Table(title=f"ring attention, B={args.batch} H={args.heads} D={args.head_dim} "
                            f"{args.dtype}, {args.threads} thread(s) per process")
        for h in MARKDOWN_HEAD:
            table.add_column(h)
        for cells in table_cells(rows):
            table.add_row(*cells)
        console.print(table)
    return 0 if all(r["status"] == "ok" for r in rows) else 1
