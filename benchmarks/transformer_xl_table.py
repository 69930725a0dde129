"""Transformer-XL (relative attention) on WikiText-2: validation perplexity by memory length,
and cached vs recomputed evaluation time, as markdown tables (mean ± 95 % CI half-width
over seeds).

    python benchmarks/transformer_xl_table.py --data-dir ../shared/datasets --out runs/txl \
        --steps 1000 --seeds 0 1

Each seed trains task ``wikitext2_xl`` (segment ``--segment``, training memory ``--mem``)
for ``--steps`` steps with ``attnlab.train.loop.train`` under ``--out/seed-N``, then
evaluates its final weights on the validation split with memory 0, 1, 2 and 4 segments
(the memory carried segment by segment from empty), and times the cached evaluation at
``--mem`` against recomputing each segment with its ``--mem`` previous tokens from scratch.
Everything it writes goes under ``--out`` (runs, ``results.json``, ``table.md``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from study import cell

from attnlab.models.transformer_xl import TransformerXL
from attnlab.tasks import get_task
from attnlab.train.loop import load_trained, train


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for runs and tables")
    p.add_argument("--data-dir", required=True, help="holds wikitext-2/ (or its files)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--segment", type=int, default=64)
    p.add_argument("--mem", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=60,
                   help="validation segments (of --batch-size columns) per evaluation")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def _config(a: argparse.Namespace, seed: int):
    return get_task("wikitext2_xl").make_config(
        seed=seed, max_steps=a.steps, eval_every=a.steps, checkpoint_every=a.steps,
        warmup_steps=max(1, a.steps // 20), batch_size=a.batch_size, lr=a.lr,
        eval_batches=a.eval_batches, threads=a.threads,
        model_kwargs={"d_model": a.d_model, "num_heads": a.heads, "num_layers": a.layers,
                      "dropout": 0.1},
        task_kwargs={"data_dir": a.data_dir, "download": False, "tokenizer": "bpe",
                     "vocab_size": a.vocab_size, "max_len": a.segment, "mem_len": a.mem,
                     "eval_mem_len": [a.mem], "eval_batch_size": a.batch_size})


def one_seed(a: argparse.Namespace, seed: int, mems: list[int]) -> dict:
    run_dir = a.out / f"seed-{seed}"
    train(_config(a, seed), run_dir, progress=False)
    task, model = load_trained(run_dir, which="last")
    # The run's model spans segment + mem; the span is a bound only (relative attention
    # has no per-position parameter), so the same weights evaluate a longer memory.
    wide = TransformerXL(**{**model.config, "max_len": a.segment + max(mems)})
    wide.load_state_dict(model.state_dict())
    wide.eval()
    ppl = {m: task.evaluate_memory(wide, "validation", m, a.eval_batches)["perplexity"]
           for m in mems}
    timing = task.cached_vs_recomputed(wide, "validation", a.mem, a.eval_batches)
    return {"seed": seed, "perplexity": ppl, "timing": timing}


def table(a: argparse.Namespace, rows: list[dict], mems: list[int]) -> str:
    seg = a.segment
    out = [f"WikiText-2 (BPE {a.vocab_size}), Transformer-XL relative attention, "
           f"{a.layers} layers, d_model {a.d_model}, {a.heads} heads, segment {seg}, "
           f"training memory {a.mem}, {a.steps} steps, batch {a.batch_size}, seeds "
           f"{[r['seed'] for r in rows]}; validation: first {a.eval_batches} segments of "
           f"{a.batch_size} columns.", "",
           "| memory (tokens) | validation perplexity |", "|---|---|"]
    for m in mems:
        out.append(f"| {m} ({m // seg}x segment) | {cell([r['perplexity'][m] for r in rows])} |")
    t = [r["timing"] for r in rows]
    out += ["", f"| evaluation at memory {a.mem} | ms / segment | perplexity |", "|---|---|---|",
            f"| cached memory | {cell([x['ms_per_segment_cached'] for x in t], 1)} | "
            f"{cell([x['perplexity_cached'] for x in t])} |",
            f"| recomputed context | {cell([x['ms_per_segment_recomputed'] for x in t], 1)} | "
            f"{cell([x['perplexity_recomputed'] for x in t])} |",
            "", f"Speed-up of the cache: {cell([x['speedup'] for x in t])}x."]
    return "\n".join(out)


def main() -> None:
    a = _args()
    a.out.mkdir(parents=True, exist_ok=True)
    mems = [0, a.segment, 2 * a.segment, 4 * a.segment]
    rows = [one_seed(a, s, mems) for s in a.seeds]
    (a.out / "results.json").write_text(json.dumps(rows, indent=2, default=float))
    text = table(a, rows, mems)
    (a.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
