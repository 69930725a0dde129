"""The long-context table of docs/benchmarks.md, read from ``attnlab bench`` runs.

A reader: it measures nothing. The runs come from the sweeps ``long_context.toml`` (every
approximate mechanism with ``sdpa`` and ``flash``, forward, 1K..32K) and
``long_context_kernel.toml`` (the kernel family at 64K), into one database:

    attnlab bench run --sweep benchmarks/long_context.toml --db results/long_context.db
    attnlab bench run --sweep benchmarks/long_context_kernel.toml --db results/long_context.db
    python benchmarks/long_context.py --db results/long_context.db --runs 1 2

Per mechanism (its label: the benchmark-sized hyperparameters of
``attnlab.bench.grid.LONG_HPARAMS`` show in it) and configuration, from the data:

* the time per length (seconds, median of ``blocked_autorange``), or the point's status;
* the fitted time exponent, :func:`attnlab.bench.analysis.fit_exponent` over 4K..32K;
* peak memory at 16K as a fraction of what ``reference`` needs there (its two
  ``(B, H, N, N)`` float32 tensors: scores and weights);
* the speed-up over ``sdpa`` at 16K.
"""

from __future__ import annotations

import argparse

from attnlab.bench.analysis import fit_exponent, format_length, status_word
from attnlab.bench.store import Store

FIT = (4096, 32768)  # the range the exponent is fitted on
AT = 16384  # the length of the memory and speed-up columns


def table(rows: list[dict], baseline: str = "sdpa") -> str:
    """The Markdown table of ``rows`` (measurements of one or more runs)."""
    series: dict[tuple, dict[int, dict]] = {}
    for r in rows:  # one series per label and configuration; a later run's point wins
        key = (r["label"], r["pass_"], r["causal"], r["batch"], r["heads"], r["head_dim"],
               r["dtype"], r["device"])
        series.setdefault(key, {})[r["N"]] = r
    lengths = sorted({r["N"] for r in rows})
    fit, at = (format_length(n) for n in FIT), format_length(AT)
    head = ["mechanism", "pass", *map(format_length, lengths), "exponent {}–{}".format(*fit),
            f"mem@{at} / reference", f"× {baseline} @{at}"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, pts in series.items():
        ok = {n: r for n, r in pts.items() if r["status"] == "ok"}
        cells = [f"{ok[n]['time_s']:.3f}" if n in ok else
                 status_word(pts[n]["status"]) if n in pts else "" for n in lengths]
        ns = sorted(ok)
        exp = fit_exponent(ns, [ok[n]["time_s"] for n in ns], *FIT)
        at = ok.get(AT)
        mem = ""
        if at is not None and at["peak_mem_bytes"] is not None:
            ref = 2 * at["batch"] * at["heads"] * AT**2 * 4  # scores + weights, float32
            mem = f"{100 * at['peak_mem_bytes'] / ref:.1f}%"
        base = series.get((baseline, *key[1:]), {}).get(AT)
        speed = (f"{base['time_s'] / at['time_s']:.2f}"
                 if at is not None and base is not None and base["status"] == "ok" else "")
        out.append(f"| {key[0]} | {key[1]}{' causal' if key[2] else ''} | " + " | ".join(cells)
                   + f" | {'' if exp is None else f'{exp:.2f}'} | {mem} | {speed} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--runs", nargs="+", required=True,
                    help="run ids ('latest' for the newest); later runs win a shared point")
    ap.add_argument("--baseline", default="sdpa")
    a = ap.parse_args(argv)
    with Store(a.db, readonly=True) as s:
        rows = [r for rid in a.runs for r in s.measurements(rid)]
    print(table(rows, a.baseline))


if __name__ == "__main__":
    main()
