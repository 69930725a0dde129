"""MiniLM attention distillation on Emotions: a small student trained with and without the
teacher's attention and value relations, mean ± 95 % CI half-width over seeds (for
docs/training.md).

    python benchmarks/distill_table.py --data-dir ../shared/datasets --out runs/distill

One teacher (``--teacher-d-model``, ``--teacher-layers``, ``--heads`` heads) is trained
first (``OUT/teacher``, ``--teacher-steps``); then every student (``--student-d-model``,
``--student-layers``, the same number of heads in its last layer, as MiniLM requires)
trains ``--steps`` steps with ``attnlab train --regime distill --regime-opt
teacher=OUT/teacher``: ``attention_weight=value_weight=0`` (the task's loss only, no
teacher in training) or MiniLM's ``L_task + L_AT + L_VR``. Both report the test KLs to the
teacher's attention and value relations. "steps to 95 %" is the first evaluation (every
``--eval-every`` steps) whose validation accuracy is >= 0.95 x the run's own best.
Runs go to ``OUT/<variant>/seed-<s>`` (benchmarks/study.py: a finished one is reused, an
interrupted one resumed); cells are mean ± 95 % CI half-width over seeds. The table is
printed and written to ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from study import cell, run_all, run_one

from attnlab.tasks import get_task
from attnlab.train.metrics import steps_to_fraction

VARIANTS = {"none": (0.0, 0.0), "minilm": (1.0, 1.0)}  # (attention_weight, value_weight)
LABELS = {"none": "student, no distillation", "minilm": "student + MiniLM (AT + VR)"}


def base(args, d_model: int, layers: int, seed: int, steps: int, threads: int, **kw):
    return get_task("emotions").make_config(
        seed=seed, max_steps=steps, eval_every=args.eval_every, threads=threads,
        warmup_steps=min(100, steps // 10), checkpoint_every=args.eval_every,
        task_kwargs={"data_dir": str(args.data_dir), "download": False},
        model_kwargs={"d_model": d_model, "num_layers": layers, "num_heads": args.heads},
        **kw)


def teacher_config(args):
    # one thread: a second one is slower on a busy machine (OpenMP barrier spins)
    return base(args, args.teacher_d_model, args.teacher_layers, 0, args.teacher_steps, 1)


def student_config(args, variant: str, seed: int):
    wa, wv = VARIANTS[variant]
    return base(args, args.student_d_model, args.student_layers, seed, args.steps, 1,
                regime="distill",
                regime_kwargs={"teacher": str(args.out.resolve() / "teacher"),
                               "attention_weight": wa, "value_weight": wv})


def table(args, teacher: dict, summaries: dict[str, list[dict]]) -> str:
    lines = [f"Emotions test set. Teacher: d_model {args.teacher_d_model}, "
             f"{args.teacher_layers} layers, {args.heads} heads, {args.teacher_steps} steps, "
             f"test accuracy {teacher['test']['accuracy']:.3f} ({teacher['parameters']:,} "
             f"parameters). Students: d_model {args.student_d_model}, {args.student_layers} "
             f"layer(s), {args.heads} heads, {args.steps} steps, {len(args.seeds)} seeds; KL "
             f"= the teacher's last-layer distribution || the student's, per head and real "
             f"token. Mean ± 95 % CI half-width over seeds.", "",
             "| student | test accuracy | steps to 95 % of best val. accuracy | "
             "attention KL | value-relation KL | train s/seed |",
             "|---|---|---|---|---|---|"]
    for variant, rows in summaries.items():
        steps = [steps_to_fraction(s["history"], "val_accuracy") for s in rows]
        lines.append(f"| {LABELS[variant]} | {cell([s['test']['accuracy'] for s in rows])} | "
                     f"{cell(steps, 0)} | {cell([s['test']['attention_kl'] for s in rows])} | "
                     f"{cell([s['test']['value_relation_kl'] for s in rows])} | "
                     f"{cell([s['train_time_s'] for s in rows], 0)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True, help="holds emotion-dair-ai/ etc.")
    p.add_argument("--out", type=Path, required=True, help="runs and table.md go here")
    p.add_argument("--steps", type=int, default=1500, help="training steps of each student")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--heads", type=int, default=4, help="of every layer, teacher and student")
    p.add_argument("--teacher-d-model", type=int, default=128)
    p.add_argument("--teacher-layers", type=int, default=2)
    p.add_argument("--student-d-model", type=int, default=32)
    p.add_argument("--student-layers", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="students at once (one thread each)")
    args = p.parse_args()
    t0 = time.perf_counter()
    teacher = run_one(teacher_config(args), str(args.out / "teacher"))
    runs = {(v, s): (student_config(args, v, s), args.out / v / f"seed-{s}")
            for v in VARIANTS for s in args.seeds}
    done = run_all(runs, args.jobs)
    text = table(args, teacher, {v: [done[(v, s)] for s in args.seeds] for v in VARIANTS})
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\n({time.perf_counter() - t0:.0f} s wall, {args.jobs} jobs)")


if __name__ == "__main__":
    main()
