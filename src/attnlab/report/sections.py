"""The report's sections and the text they share: the quality sentences of the summary, the
every-test-metric table, attention maps, sparsity patterns, inpainting, advisor and the
reproduction record. Each section function takes the
:class:`~attnlab.report.document.Report` being built and adds to it;
:mod:`attnlab.report.build` calls them in order (once per task, so nothing here reads the
plan's task list)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from attnlab import stats
from attnlab.bench.analysis import format_length
from attnlab.report.advisor import Advice, advise, answers, fit_rows
from attnlab.report.document import Report
from attnlab.report.leaderboard import (
    BASELINE,
    baseline_row,
    quality_text,
    seeds_text,
    verdict,
)
from attnlab.report.patterns import (
    plot_attention,
    plot_attention_grid,
    plot_patterns,
    sparsity_pattern,
    structured_mechanisms,
)
from attnlab.report.samples import attention_sample, inpainting_rows, plot_inpainting
from attnlab.train.task import get_task
from attnlab.util.fmt import format_mib
from attnlab.version import __version__

__all__ = ["advice", "all_test_metrics", "attention", "inpainting", "patterns",
           "quality_sentences", "render_advice", "reproduce"]

PATTERN_N = 64  # long enough to show a window and its blocks, short enough to see cells


def advice(rows: list[dict], lb: list[dict], questions, pass_: str,
           causal: bool = False) -> list[Advice]:
    """One :class:`Advice` per ``(N, budget)`` question, with the leaderboard's quality
    (its per-seed values too, so that the advisor can test differences)."""
    quality = {r["name"]: {"mean": r["test_mean"], "std": r["test_std"], "metric": r["metric"],
                           "mode": r["mode"], "values": r["test_values"]}
               for r in lb if r.get("test_mean") is not None}
    return [advise(rows, n, budget, quality=quality, pass_=pass_, causal=causal)
            for n, budget in questions]


def _listing(rows: list[dict], key: str) -> str:
    return ", ".join(f"{r['name']} ({stats.format_p(r[key].p)}, {seeds_text(r[key])})"
                     for r in rows)


def _by_verdict(rows: list[dict], key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"better": [], "worse": [], "same": [], "untested": []}
    for r in rows:
        if r.get(key) is not None:
            out[verdict(r[key], r["mode"])].append(r)
    return out


def quality_sentences(lb: list[dict], task: str) -> list[str]:
    """The summary's words on quality: the best, and which differences from it and from
    :data:`~attnlab.report.leaderboard.BASELINE` are significant (Welch's t-test over
    seeds, ``p < ALPHA``) and which are not, each with its p-value and seeds."""
    trained = [r for r in lb if r.get("test_mean") is not None]
    if not trained:
        return []
    best, a = trained[0], f"p < {stats.ALPHA:g}"
    ci = f" (mean ± 95% confidence interval over {best['n_seeds']} seeds)" \
        if best["n_seeds"] > 1 else ""
    out = [f"Best test {best['metric']} on {task}: {best['name']} at {quality_text(best)}{ci}. "
           f"A difference is a finding only when Welch's t-test over the seeds finds it "
           f"significant ({a}); one within the seed-to-seed spread is not."]
    # when the best is the baseline itself, the comparisons with it below say it all
    vb = _by_verdict(trained if best is not baseline_row(trained) else [], "vs_best")
    if vb["same"]:
        out.append(f"{best['name']} is not significantly better than "
                   f"{_listing(vb['same'], 'vs_best')}.")
    if vb["worse"]:
        out.append(f"Significantly worse than {best['name']} ({a}): "
                   f"{_listing(vb['worse'], 'vs_best')}.")
    untested = sorted({r["name"] for k in ("vs_best", "vs_baseline")
                       for r in _by_verdict(trained, k)["untested"]})
    if untested:
        out.append(f"Too few seeds for a test (fewer than 2 on a side): {', '.join(untested)}; "
                   f"ranked by the mean only.")
    vs = _by_verdict(trained, "vs_baseline")
    same = vs["same"]
    if len(same) == 1:
        r = same[0]
        out.append(f"{r['name']} and {BASELINE} do not differ significantly on {task} "
                   f"({stats.format_p(r['vs_baseline'].p)}, {seeds_text(r['vs_baseline'])}).")
    elif same:
        out.append(f"Not significantly different from {BASELINE} on {task}: "
                   f"{_listing(same, 'vs_baseline')}.")
    for word in ("better", "worse"):
        if vs[word]:
            out.append(f"Significantly {word} than {BASELINE} on {task} ({a}): "
                       f"{_listing(vs[word], 'vs_baseline')}.")
    return out


def _ci_text(vals: list[float]) -> str:
    ci = stats.confidence_interval(vals)
    if ci.low is None:
        return f"{ci.mean:.4g} ({ci.note})"
    return f"{ci.mean:.4g} ± {ci.half_width:.2g}"


def all_test_metrics(rep: Report, lb: list[dict], trainings: list[dict]) -> None:
    """Every scalar test metric (accuracy and macro-F1, PSNR and SSIM, perplexity, ...) as
    mean ± 95% CI over the seeds, in the leaderboard's order, each marked where it differs
    significantly from :data:`~attnlab.report.leaderboard.BASELINE`'s."""
    by: dict[str, dict[str, list[float]]] = {}
    for t in sorted(trainings, key=lambda t: (t["mechanism"], t["seed"])):
        if t["model"] != "transformer":
            continue
        for k, v in t["summary"]["test"].items():
            # "n" counts the test examples: the same for every run, not a quality
            if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool):
                by.setdefault(t["mechanism"], {}).setdefault(k, []).append(float(v))
    keys = sorted({k for per in by.values() for k in per})
    if not keys:
        return
    base = by.get(BASELINE, {})
    rows = []
    for m in dict.fromkeys(r["mechanism"] for r in lb if r["mechanism"] in by):
        cells = []
        for k in keys:
            vals = by[m].get(k)
            mark = ""
            if vals and base.get(k) and m != BASELINE:
                d = stats.welch(vals, base[k])
                mark = (" ▲" if d.diff > 0 else " ▼") if d.significant else ""
            cells.append(_ci_text(vals) + mark if vals else "-")
        rows.append([m, *cells])
    rep.table(["mechanism", *keys], rows, caption=(
        f"Every test metric: mean ± half-width of the 95% confidence interval over seeds "
        f"(Student t); ▲/▼ significantly higher/lower than {BASELINE} (Welch's t-test, "
        f"p < {stats.ALPHA:g}; whether higher is better depends on the metric), no mark: no "
        f"significant difference or too few seeds for a test."))


def attention(rep: Report, figs: Path, plan, dirs: dict[str, list[Path]],
              console: Console, load=None) -> None:
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
    if get_task(plan.task).kind != "inpainting" or not dirs:
        return
    rep.section("Inpainting", "inpainting")
    rows = inpainting_rows({m: ds[0] for m, ds in dirs.items()}, load=load)
    png, svg = plot_inpainting(rows, figs / "inpainting")
    rep.figure(svg, png, caption="Test images: original, masked input, and each "
                                 "mechanism's reconstruction (PSNR on the missing pixels).")


def render_advice(rep: Report, advices: list[Advice], *, title: str = "Advisor",
                  anchor: str = "advisor") -> None:
    rep.section(title, anchor)
    rep.paragraph("Which mechanism to use at a sequence length and memory budget, from the "
                  "measured points (interpolated in log-log between lengths, extrapolated "
                  "with the fitted exponent beyond them; every figure says which) and the "
                  "trained quality. Recommended = the fastest of the mechanisms as accurate "
                  "as the most accurate one, i.e. not significantly worse by Welch's t-test "
                  f"over seeds (p < {stats.ALPHA:g}); where there are too few seeds for a "
                  "test the advice says so and compares the means (within 1%). Ask other "
                  "questions with `attnlab report RUN_DIR --advise N[:BUDGET]`.")
    for a in advices:
        budget = "no memory budget" if a.memory_budget_bytes is None else \
            f"memory budget {format_mib(a.memory_budget_bytes, 0)}"
        rep.paragraph(f"N = {format_length(a.n)}, {budget}. " + " ".join(
            f"{what}: {text}." for what, text in answers(a)))
        rows = fit_rows(a) + [[e["name"], "-", "-", "excluded", e["reason"]]
                              for e in a.excluded]
        rep.table(["mechanism", "time", "memory", "estimate", "quality / why excluded"], rows,
                  caption=f"Advice at N={format_length(a.n)} ({budget}).")
        rep.code("\n".join(f"{i}. {line}" for i, line in enumerate(a.reasoning, 1)))


def reproduce(rep: Report, run_dir: Path, plan, state: dict, bench: dict,
              trainings: list[dict]) -> None:
    rep.section("Reproduce", "reproduce")
    m, v = bench["machine"], bench["versions"]
    commits = sorted({t["git_commit"] or "-" for t in trainings} | {bench["git_commit"] or "-"})
    rep.table(["what", "value"], [
        ["machine", f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM"
                    + (f", GPU {m['gpu']}" if m.get("gpu") else "")],
        ["matmul roof", f"{m.get('roof_gflops', float('nan')):.0f} GFLOP/s"],
        ["versions", ", ".join(f"{k} {val}" for k, val in sorted(v.items()))],
        ["attnlab (report)", __version__],
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
