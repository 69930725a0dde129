"""Normal vs FGM vs PGD adversarial training on Emotions: clean and attacked test accuracy,
attention entropy clean and under attack, mean ± 95 % CI half-width over seeds (for
docs/training.md).

    python benchmarks/adversarial_table.py --data-dir ../shared/datasets --out runs/adversarial

Every run is ``attnlab train --task emotions --regime adversarial --regime-opt
train_attack=<none|fgm|pgd>`` with the task's default model and the same budget
(``--steps``), evaluated under the same attack (PGD of ``--eps``, ``--eval-steps`` steps).
Runs go to ``OUT/<attack>/seed-<s>`` (benchmarks/study.py: a finished one is reused, an
interrupted one resumed); cells are mean ± 95 % CI half-width over seeds. The table is
printed and written to ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from study import cell, run_all

from attnlab.tasks import get_task

ATTACKS = ("none", "fgm", "pgd")
LABELS = {"none": "normal", "fgm": "FGM (Miyato et al. 2017)", "pgd": "PGD (Madry et al. 2018)"}


def config(args, attack: str, seed: int):
    return get_task("emotions").make_config(
        seed=seed, max_steps=args.steps, eval_every=max(1, args.steps // 4), threads=1,
        task_kwargs={"data_dir": str(args.data_dir), "download": False},
        regime="adversarial",
        regime_kwargs={"train_attack": attack, "eps": args.eps, "pgd_steps": args.pgd_steps,
                       "eval_steps": args.eval_steps})


def table(args, summaries: dict[str, list[dict]]) -> str:
    lines = [f"Emotions test set, {len(args.seeds)} seeds, {args.steps} steps each; attack: "
             f"PGD, L2 eps={args.eps} per sequence on the embeddings, {args.eval_steps} "
             f"steps; training attack eps={args.eps} (PGD: {args.pgd_steps} steps). "
             f"Mean ± 95 % CI half-width over seeds.", "",
             "| training | clean accuracy | attacked accuracy | attention entropy (clean) | "
             "attention entropy (attacked) | train s/seed |",
             "|---|---|---|---|---|---|"]
    for attack in ATTACKS:
        rows = summaries[attack]

        def col(key, rows=rows):
            return [s["test"][key] for s in rows]

        lines.append(f"| {LABELS[attack]} | {cell(col('accuracy'))} | "
                     f"{cell(col('attacked_accuracy'))} | {cell(col('attention_entropy'))} | "
                     f"{cell(col('attacked_attention_entropy'))} | "
                     f"{cell([s['train_time_s'] for s in rows], 0)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True, help="holds emotion-dair-ai/ etc.")
    p.add_argument("--out", type=Path, required=True, help="runs and table.md go here")
    p.add_argument("--steps", type=int, default=1200, help="training steps of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eps", type=float, default=1.0, help="L2 radius, training and attack")
    p.add_argument("--pgd-steps", type=int, default=3, help="PGD steps in training")
    p.add_argument("--eval-steps", type=int, default=10, help="PGD steps of the attack")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    args = p.parse_args()
    t0 = time.perf_counter()
    runs = {(a, s): (config(args, a, s), args.out / a / f"seed-{s}")
            for a in ATTACKS for s in args.seeds}
    done = run_all(runs, args.jobs)
    text = table(args, {a: [done[(a, s)] for s in args.seeds] for a in ATTACKS})
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\n({time.perf_counter() - t0:.0f} s wall, {args.jobs} jobs)")


if __name__ == "__main__":
    main()
