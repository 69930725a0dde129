"""attnlab against the PyPI peers, pair by pair, read from an ``attnlab bench`` run.

A reader: it measures nothing. The run comes from the sweep ``peers.toml`` (each pair on
the same q, k, v, in one run, each point in its own child process):

    attnlab bench run --sweep benchmarks/peers.toml --db results/peers.db
    python benchmarks/peers_table.py --db results/peers.db --runs latest

A pair is an attnlab mechanism and the peer that computes the same function (``PAIRS``,
matched by mechanism name; each side's hyperparameters are in its label). ``×`` is the
peer's time over attnlab's (above 1: attnlab is faster), taken within each run; with
several runs every cell is the median and its min-max range. Error is the stored
``||out - exact|| / ||exact||`` against SDPA on the same inputs (the reformer pair's
exact has the given ``k``, which both sides ignore: the same reference for both).
"""

from __future__ import annotations

import argparse

from bench_spread import spread

from attnlab.bench.analysis import format_length, status_word
from attnlab.bench.store import Store

#: attnlab mechanism -> the peer that computes the same function in peers.toml.
PAIRS = {"performer": "peer:performer_pytorch", "block_sparse": "peer:local_attention",
         "reformer": "peer:reformer_pytorch"}
PASSES = ("fwd", "fwd+bwd")


def collect(runs: list[list[dict]]) -> dict[tuple, dict[str, list]]:
    """Per ``(pair, N, causal)``: the peer's and attnlab's times per pass, their ratios
    (within each run), the errors, and the statuses of points that were not ok."""
    cells: dict[tuple, dict[str, list]] = {}
    for rows in runs:
        by = {(r["mechanism"], r["N"], r["pass_"], r["causal"]): r for r in rows}
        for (mech, n, p, causal), ours in by.items():
            if mech not in PAIRS:
                continue
            peer = by.get((PAIRS[mech], n, p, causal))
            c = cells.setdefault((mech, n, causal), {})
            for side, r in (("attnlab", ours), ("peer", peer)):
                if r is None:
                    continue
                if r["status"] != "ok":
                    c.setdefault(f"{p} {side} status", []).append(status_word(r["status"]))
                    continue
                c.setdefault(f"{p} {side}", []).append(r["time_s"])
                if r["error"] is not None:  # one error per pair and run: the first pass's
                    c.setdefault(f"error {side} {p}", []).append(r["error"])
            if peer is not None and ours["status"] == peer["status"] == "ok":
                c.setdefault(f"{p} ×", []).append(peer["time_s"] / ours["time_s"])
    return cells


def table(cells: dict[tuple, dict[str, list]]) -> str:
    cols = [f"{p} {what}" for p in PASSES for what in ("peer", "attnlab", "×")]
    head = ["pair", "N", *(c + (" (s)" if not c.endswith("×") else "") for c in cols),
            "error peer", "error attnlab"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (mech, n, causal), c in sorted(cells.items()):
        row = [f"{mech} / {PAIRS[mech]}" + (" causal" if causal else ""), format_length(n)]
        for side in ("peer", "attnlab"):  # the forward's error, else the other pass's
            c[f"error {side}"] = next((c[k] for p in PASSES if (k := f"error {side} {p}") in c),
                                      [])
        for col in (*cols, "error peer", "error attnlab"):
            fmt = ".2f" if col.endswith("×") else ".4f" if col.startswith("error") else ".3f"
            words = sorted(set(c.get(col + " status", [])))
            row.append(spread(c[col], fmt) if c.get(col) else "/".join(words) or "-")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--runs", nargs="+", required=True, help="run ids ('latest' for the newest)")
    a = ap.parse_args(argv)
    with Store(a.db, readonly=True) as s:
        runs = [s.measurements(rid) for rid in a.runs]
    print(table(collect(runs)))


if __name__ == "__main__":
    main()
