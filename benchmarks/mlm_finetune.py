"""Does BERT-style pre-training help a small encoder? MLM on WikiText-2, then fine-tuning.

    python benchmarks/mlm_finetune.py --data-dir ../shared/datasets --out runs/mlm_finetune

1. Pre-trains one encoder (task ``mlm``: WordPiece, 15 % of tokens masked 80/10/10) on
   the real WikiText-2 and prints its validation MLM accuracy and perplexity at every
   evaluation, then the test figures.
2. Fine-tunes ``emotions`` and ``imdb`` classifiers of the same shape (``d_model``,
   ``num_heads``, ``num_layers``), each from the pre-trained encoder (``init_from``: its
   weights and its tokenizer) and from scratch (the task's own tokenizer, trained on the
   task's training split: the usual recipe), with the same fine-tuning budget (steps,
   batch, learning rate) and ``--seeds`` seeds each. IMDB is a balanced random subset
   (``--imdb-subset`` reviews of each official split, seeded, written under ``--out``):
   tokenizing and testing on all 50k reviews would cost more than the fine-tuning itself.
3. Prints a markdown table: test accuracy mean ± std over the seeds, the 95 % Student-t
   interval of the mean (``attnlab.stats.confidence_interval``), and Welch's test of
   pre-trained vs scratch (``attnlab.stats.welch``).

Everything is written under ``--out`` (one run directory per run); nothing is downloaded.
``--steps N`` sets both budgets at once, for a quick end-to-end check.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import sys
import time
from pathlib import Path

from attnlab import stats
from attnlab.tasks import get_task
from attnlab.train.loop import train

TASK_LEN = {"emotions": 64, "imdb": 128}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"))
    p.add_argument("--out", type=Path, required=True, help="folder for every run (new)")
    p.add_argument("--tasks", nargs="+", default=list(TASK_LEN), choices=list(TASK_LEN))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=None, help="both budgets (a quick check)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--max-len", type=int, default=128, help="pre-training window")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--imdb-subset", type=int, default=5000,
                   help="IMDB reviews kept per split, half of each class; 0: all 25k")
    p.add_argument("--mechanism", default="sdpa")
    p.add_argument("--threads", type=int, default=2)
    return p


def _model(args) -> dict:
    return {"d_model": args.d_model, "num_heads": args.num_heads,
            "num_layers": args.num_layers}


def pretrain(args, steps: int) -> Path:
    run_dir = args.out / "pretrain"
    cfg = get_task("mlm").make_config(
        mechanism=args.mechanism, max_steps=steps, batch_size=args.batch_size, lr=1e-3,
        warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 5), eval_batches=10,
        checkpoint_every=max(1, steps // 5), model_kwargs=_model(args), threads=args.threads,
        task_kwargs={"data_dir": str(args.data_dir), "download": False,
                     "max_len": args.max_len, "vocab_size": args.vocab_size})
    t0 = time.perf_counter()
    result = train(cfg, run_dir, progress=False)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"## MLM pre-training on WikiText-2 ({steps} steps, {time.perf_counter() - t0:.0f} s)"
          "\n\n| step | train loss | val MLM accuracy | val MLM perplexity |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['train_loss']:.3f} | {r['val_mlm_accuracy']:.3f} | "
              f"{r['val_mlm_perplexity']:.1f} |")
    t = result.test
    print(f"\ntest (best weights): MLM accuracy {t['mlm_accuracy']:.3f}, MLM perplexity "
          f"{t['mlm_perplexity']:.1f} over {t['masked_tokens']} masked tokens\n", flush=True)
    return run_dir


def imdb_subset(args) -> Path:
    """A folder holding ``imdb_aclImdb_v1.csv`` with ``--imdb-subset`` reviews of each
    split, half positive (seeded); the full data's folder when the subset is 0."""
    if not args.imdb_subset:
        return args.data_dir
    src = args.data_dir / "imdb" / "imdb_aclImdb_v1.csv.gz"
    csv.field_size_limit(sys.maxsize)
    with gzip.open(src, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    header, groups = rows[0], {}
    for r in rows[1:]:
        groups.setdefault((r[2], r[1]), []).append(r)  # (split, sentiment)
    rng, keep = random.Random(0), []
    for key in sorted(groups):
        keep += rng.sample(groups[key], args.imdb_subset // 2)
    folder = args.out / "imdb-subset"
    folder.mkdir(parents=True)
    with open(folder / "imdb_aclImdb_v1.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header, *keep])
    return folder


def finetune(args, task: str, start: Path | None, seed: int, steps: int) -> float:
    who = "pretrained" if start else "scratch"
    cfg = get_task(task).make_config(
        mechanism=args.mechanism, seed=seed, max_steps=steps, batch_size=args.batch_size,
        lr=1e-3, warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 4),
        eval_batches=10, checkpoint_every=steps, model_kwargs=_model(args),
        threads=args.threads, init_from=str(start) if start else None,
        task_kwargs={"data_dir": str(args.imdb_dir if task == "imdb" else args.data_dir),
                     "download": False, "max_len": TASK_LEN[task]})
    result = train(cfg, args.out / task / who / f"seed-{seed}", progress=False)
    return float(result.test["accuracy"])


def _cell(xs: list[float]) -> tuple[str, str]:
    sd = stats.std(xs)
    ci = stats.confidence_interval(xs)
    spread = f"{stats.mean(xs):.3f} ± {sd:.3f}" if sd is not None else f"{xs[0]:.3f}"
    interval = f"[{ci.low:.3f}, {ci.high:.3f}]" if ci.low is not None else ci.note
    return spread, interval


def table(results: dict[tuple[str, str], list[float]], tasks, steps: int) -> None:
    print(f"## Fine-tuning, {steps} steps each: test accuracy over seeds\n\n"
          "| task | start | test accuracy (mean ± std) | 95 % CI | seeds | pretrained - "
          "scratch |\n|---|---|---|---|---|---|")
    for task in tasks:
        diff = stats.welch(results[task, "pretrained"], results[task, "scratch"])
        p = stats.format_p(diff.p) if diff.tested else diff.how
        for who in ("scratch", "pretrained"):
            xs = results[task, who]
            spread, interval = _cell(xs)
            gap = f"{diff.diff:+.3f} ({p})" if who == "pretrained" else ""
            print(f"| {task} | {who} | {spread} | {interval} | "
                  f"{', '.join(f'{x:.3f}' for x in xs)} | {gap} |")


def main() -> None:
    args = _parser().parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out} is not empty: choose a new folder")
    pre_steps = args.steps or args.pretrain_steps
    fine_steps = args.steps or args.finetune_steps
    t0 = time.perf_counter()
    source = pretrain(args, pre_steps)
    args.imdb_dir = imdb_subset(args) if "imdb" in args.tasks else None
    results: dict[tuple[str, str], list[float]] = {}
    for task in args.tasks:
        for who, start in (("scratch", None), ("pretrained", source)):
            results[task, who] = [finetune(args, task, start, s, fine_steps)
                                  for s in args.seeds]
    table(results, args.tasks, fine_steps)
    subset = f"IMDB {args.imdb_subset} + {args.imdb_subset} reviews" if args.imdb_subset \
        else "IMDB 25k + 25k"
    print(f"\n(total {time.perf_counter() - t0:.0f} s; {args.mechanism}, d_model "
          f"{args.d_model}, {args.num_layers} layers, {args.num_heads} heads; {subset})")


if __name__ == "__main__":
    main()
