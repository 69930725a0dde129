"""The report's later sections: attention maps, sparsity patterns, inpainting, advisor and
the reproduction record. Each takes the :class:`~attnlab.report.document.Report` being
built and adds its section; :mod:`attnlab.report.build` calls them in order."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from attnlab.report.advisor import Advice, advise, fit_rows
from attnlab.report.document import Report

__all__ = ["advice", "attention", "inpainting", "patterns", "render_advice", "reproduce"]

PATTERN_N = 64  # long enough to show a window and its blocks, short enough to see cells


def advice(rows: list[dict], lb: list[dict], questions, pass_: str) -> list[Advice]:
    """One :class:`Advice` per ``(N, budget)`` question, with the leaderboard's quality."""
    quality = {r["name"]: {"mean": r["test_mean"], "std": r["test_std"], "metric": r["metric"],
                           "mode": r["mode"]}
               for r in lb if r.get("test_mean") is not None}
    return [advise(rows, n, budget, quality=quality, pass_=pass_) for n, budget in questions]


def attention(rep: Report, figs: Path, plan, dirs: dict[str, list[Path]],
              console: Console, load=None) -> None:
    from attnlab.report.patterns import plot_attention, plot_attention_grid
    from attnlab.report.samples import attention_sample
    rep.section("Attention maps", "attention")
    if not dirs:
        rep.paragraph("No trained models to draw.")
        return
    first = next(iter(dirs.values()))[0]
    try:
        sample = attention_sample(first, load=load)
    except ValueError as e:
        rep.paragraph(str(e) + ".")
        return
    what = "The same test input" + (f" (label {sample['label']})" if sample["label"] else "")
    rep.paragraph(f"{what}, through each mechanism's trained model (seed {first.name[5:]}, "
                  f"best validation weights), last layer:")
    rep.code(sample["input"])  # dataset text: escaped by the document, shown as typed
    rep.paragraph("Mechanisms that never form their weights (kernel, low-rank, sparse, "
                  "flash) are drawn with their effective weights A, where out = A v: what "
                  "each value position contributes to each query.")
    means, per_mech = {}, {}
    for i, (m, ds) in enumerate(dirs.items(), 1):
        console.print(f"  attention map {i}/{len(dirs)}: {m}")
        # the same text for every model (image tasks always take the first test image)
        try:
            s = sample if i == 1 else attention_sample(ds[0], text=sample["input"], load=load)
        except (ValueError, RuntimeError, OSError) as e:  # one broken run: say so, go on
            rep.paragraph(f"{m}: no attention map ({e}).")
            continue
        w = s["layers"][-1]                                   # (H, N, N)
        means[f"{m} -> {s['prediction']}" if s["prediction"] is not None else m] = w.mean(0)
        per_mech[m] = (s["tokens"], w)
    tokens = sample["tokens"]
    png, svg = plot_attention_grid(tokens, means, figs / "attention_overview",
                                   title="mean over heads, last layer (-> prediction)")
    rep.figure(svg, png, caption="Each mechanism's attention on the same input, averaged "
                                 "over heads; rows are queries, columns keys.")
    for m, (toks, w) in per_mech.items():
        png, svg = plot_attention(toks, w, figs / f"attention-{m}", title=f"{m}: last layer")
        rep.figure(svg, png, caption=f"{m}: every head of the last layer, and their mean.")


def patterns(rep: Report, figs: Path, plan) -> None:
    from attnlab.report.patterns import plot_patterns, sparsity_pattern, structured_mechanisms
    names = [m for m in plan.mechanisms if m in structured_mechanisms()]
    rep.section("Sparsity patterns", "patterns")
    if not names:
        rep.paragraph("None of the compared mechanisms has a fixed attention pattern.")
        return
    masks = {m: sparsity_pattern(m, PATTERN_N, **plan.mechanism_kwargs.get(m, {}))
             for m in names}
    png, svg = plot_patterns(masks, figs / "sparsity_patterns")
    rep.figure(svg, png, caption=f"Which keys (columns) each query (row) may attend at "
                                 f"N={PATTERN_N}, read from each mechanism itself with the "
                                 f"hyperparameters it was trained with; black = attended.")


def inpainting(rep: Report, figs: Path, plan, dirs: dict[str, list[Path]],
               load=None) -> None:
    from attnlab.tasks.base import get_task
    if get_task(plan.task).kind != "inpainting" or not dirs:
        return
    from attnlab.report.samples import inpainting_rows, plot_inpainting
    rep.section("Inpainting", "inpainting")
    rows = inpainting_rows({m: ds[0] for m, ds in dirs.items()}, load=load)
    png, svg = plot_inpainting(rows, figs / "inpainting")
    rep.figure(svg, png, caption="Test images: original, masked input, and each "
                                 "mechanism's reconstruction (PSNR on the missing pixels).")


def render_advice(rep: Report, advices: list[Advice]) -> None:
    from attnlab.bench.analysis import format_length
    rep.section("Advisor", "advisor")
    rep.paragraph("Which mechanism to use at a sequence length and memory budget, from the "
                  "measured points (interpolated in log-log between lengths, extrapolated "
                  "with the fitted exponent beyond them) and the trained quality. Recommended "
                  "= the fastest whose quality is within 1% of the best. Ask other questions "
                  "with `attnlab report RUN_DIR --advise N[:BUDGET]`.")
    for a in advices:
        budget = "no memory budget" if a.memory_budget_bytes is None else \
            f"memory budget {a.memory_budget_bytes / 2**20:.0f} MiB"
        rep.paragraph(f"N = {format_length(a.n)}, {budget}: fastest {a.fastest or '-'}, most "
                      f"accurate {a.most_accurate or '-'}, recommended {a.recommended or '-'}.")
        rows = fit_rows(a) + [[e["name"], "-", "-", "excluded", e["reason"]]
                              for e in a.excluded]
        rep.table(["mechanism", "time", "memory", "estimate", "quality / why excluded"], rows,
                  caption=f"Advice at N={format_length(a.n)} ({budget}).")
        rep.code("\n".join(f"{i}. {line}" for i, line in enumerate(a.reasoning, 1)))


def reproduce(rep: Report, run_dir: Path, plan, state: dict, bench: dict,
              trainings: list[dict]) -> None:
    import attnlab
    rep.section("Reproduce", "reproduce")
    m, v = bench["machine"], bench["versions"]
    commits = sorted({t["git_commit"] or "-" for t in trainings} | {bench["git_commit"] or "-"})
    rep.table(["what", "value"], [
        ["machine", f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM"
                    + (f", GPU {m['gpu']}" if m.get("gpu") else "")],
        ["matmul roof", f"{m.get('roof_gflops', float('nan')):.0f} GFLOP/s"],
        ["versions", ", ".join(f"{k} {val}" for k, val in sorted(v.items()))],
        ["attnlab (report)", attnlab.__version__],
        ["commit", ", ".join(commits)],
        ["started", state.get("started_at", "-")],
        ["finished", state.get("finished_at", "-")],
        ["run directory", str(run_dir)],
    ], caption="Where and with what these numbers were measured.")
    rep.paragraph("The exact command (run it again to resume or to reproduce):")
    rep.code(state.get("command") or "attnlab compare")
    rep.paragraph("Rebuild this report from the stored results:")
    rep.code(f"attnlab report {run_dir}")
    rep.paragraph("The plan (every setting of the benchmark and of the training runs):")
    rep.code(json.dumps(plan.to_json(), indent=1, sort_keys=True))
