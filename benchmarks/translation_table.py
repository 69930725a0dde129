"""Translation (num2words German -> English numbers) per attention mechanism: BLEU / chrF /
ROUGE-L of greedy and beam search on held-out numbers, as a markdown table for
docs/training.md.

    python benchmarks/translation_table.py --out /tmp/translation --steps 1500 --seeds 0 1

Every mechanism trains the same encoder-decoder (``Seq2SeqTransformer``; cross-attention
``sdpa`` for all) on the same corpus; the rows differ only in the self-attention:

* ``sdpa`` -- dense softmax attention (encoder and decoder self-attention);
* ``sliding_window`` -- sparse, a local window (encoder and causal decoder);
* ``performer`` -- kernel (FAVOR+ random features), encoder and causal decoder;
* ``linformer`` -- low-rank (keys/values projected to ``k`` rows), encoder only: it has no
  causal form, so the decoder keeps ``sdpa`` (``decoder_mechanism``).

Test scores are mean ± 95 % CI half-width over ``--seeds``. Runs go under ``--out``
only; a finished one is reused, an interrupted one resumed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from study import cell
from study import run_one as run_one_study

from attnlab.tasks import get_task

# name -> (what it covers, mechanism_kwargs, extra model options)
MECHANISMS = {
    "sdpa": ("dense softmax: enc + dec self", {}, {}),
    "sliding_window": ("sparse window 8: enc + dec self", {"window": 8}, {}),
    "performer": ("kernel FAVOR+: enc + dec self", {}, {}),
    "linformer": ("low-rank k=16: enc self (dec sdpa)", {"k": 16},
                  {"decoder_mechanism": "sdpa"}),
}
METRICS = ("bleu", "chrf", "rougeL", "exact")


def run_one(args, name: str, seed: int) -> dict:
    _, mkw, extra = MECHANISMS[name]
    cfg = get_task("translation").make_config(
        mechanism=name, mechanism_kwargs=mkw, seed=seed, max_steps=args.steps,
        threads=args.threads,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=min(100, args.steps // 10),
        eval_every=max(1, args.steps // 2), eval_batches=1,
        model_kwargs={"d_model": args.d_model, "num_heads": 4, "num_layers": args.layers,
                      "dropout": 0.1, **extra},
        task_kwargs={"src_lang": args.src, "tgt_lang": args.tgt,
                     "max_number": args.max_number, "n_validation": args.n_eval,
                     "n_test": args.n_eval, "beam_size": args.beam, "max_len": 50})
    return run_one_study(cfg, args.out / name / f"seed-{seed}")["test"]  # reused when done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the runs")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS),
                   choices=list(MECHANISMS))
    p.add_argument("--src", default="de")
    p.add_argument("--tgt", default="en")
    p.add_argument("--max-number", type=int, default=9999)
    p.add_argument("--n-eval", type=int, default=200, help="validation and test numbers")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    t0 = time.time()
    results = {m: [run_one(args, m, s) for s in args.seeds] for m in args.mechanisms}
    beam = f"beam{args.beam}"
    print(f"num2words {args.src} -> {args.tgt}, numbers 0..{args.max_number}, "
          f"{args.n_eval} test numbers unseen in training; {args.steps} steps, "
          f"d_model {args.d_model}, {args.layers}+{args.layers} layers, char tokenizers; "
          f"seeds {args.seeds} (mean ± 95 % CI half-width); {time.time() - t0:.0f} s in all\n")
    print("| mechanism | covers | decoding | BLEU | chrF | ROUGE-L | exact |")
    print("|---|---|---|---|---|---|---|")
    for m, tests in results.items():
        for dec in ("greedy", beam):
            cells = [cell([t[f"{k}_{dec}"] for t in tests], 3 if k in ("rougeL", "exact")
                          else 1) for k in METRICS]
            print(f"| {m} | {MECHANISMS[m][0]} | {dec} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
