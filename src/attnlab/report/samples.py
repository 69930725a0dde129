"""What trained models do with one sample input: attention maps and inpainted images.

Read from the stored runs (``train/<mechanism>/seed-<s>/`` with ``best.pt``), never from
memory, so ``attnlab report RUN_DIR`` draws the same figures as the compare that trained
them. Every mechanism sees the same input: a test example chosen once by a fixed rule.

Attention weights are the model's own for mechanisms that form them, and the *effective*
weights ``A`` (``out = A v``) for those that do not (kernel, low-rank, sparse, flash; see
:class:`attnlab.nn.MultiheadAttention`): what each value position contributes to each query.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from attnlab.data.inpaint import apply_mask
from attnlab.report.figures import mpl, plain, save
from attnlab.train.loop import load_trained
from attnlab.train.metrics import psnr

__all__ = ["attention_sample", "pick_text", "inpainting_rows", "plot_inpainting"]


def pick_text(task, max_tokens: int) -> tuple[str, str]:
    """The first test text whose tokens fit ``max_tokens`` (else the shortest), and its
    label: short enough that every token can be a readable axis label."""
    split = task.dataset.splits["test"]
    ids = task.ids["test"]
    fits = [i for i, x in enumerate(ids) if 4 <= len(x) <= max_tokens]
    i = fits[0] if fits else min(range(len(ids)), key=lambda j: len(ids[j]))
    return split.texts[i], task.classes[split.labels[i]]


def _patch_tokens(task, mask: torch.Tensor) -> list[str]:
    """Patch labels in raster order: ``r<row>c<col>``, ``*`` marking a patch with missing
    pixels (the ones the model has to fill in)."""
    p = task.opts["patch_size"]
    m = mask[0, 0]
    rows, cols = m.shape[0] // p, m.shape[1] // p
    return [f"r{r}c{c}" + ("*" if bool(m[r * p:(r + 1) * p, c * p:(c + 1) * p].any()) else "")
            for r in range(rows) for c in range(cols)]


def attention_sample(run_dir: str | Path, *, text: str | None = None,
                     max_tokens: int = 24, load=None) -> dict[str, Any]:
    """The trained model of ``run_dir`` on one input: ``tokens``, ``layers`` (per layer
    ``(H, N, N)``), ``input`` (text or description), ``label`` and ``prediction``.

    Text classification: ``text`` (default :func:`pick_text`). Inpainting: the first test
    image, its patches as tokens. Other tasks raise ``ValueError`` (their models have no
    attention-map view yet). ``load``: how a run is loaded (default
    :func:`~attnlab.train.loop.load_trained`; the report passes a cached one)."""
    task, model = (load or load_trained)(Path(run_dir))
    if hasattr(task, "explain"):
        label = None
        if text is None:
            text, label = pick_text(task, max_tokens)
        res = task.explain(model, text)
        pred = max(res["probabilities"], key=res["probabilities"].get)
        return {"tokens": res["tokens"], "layers": res["attention"], "input": text,
                "label": label, "prediction": pred}
    if task.kind == "inpainting" and hasattr(model, "attention_maps"):
        x, m = task.images["test"][:1], task.fixed_masks["test"][:1]
        layers = [w[0] for w in model.attention_maps(apply_mask(x, m), m)]
        return {"tokens": _patch_tokens(task, m), "layers": layers,
                "input": "test image 0 (patches with missing pixels marked *)",
                "label": None, "prediction": None}
    raise ValueError(f"attention maps are drawn for text classification and inpainting "
                     f"tasks; {task.name!r} is a {task.kind} task")


def inpainting_rows(run_dirs: dict[str, Path], n: int = 6, load=None) -> dict[str, Any]:
    """The first ``n`` test images, their masked inputs and each model's reconstruction
    (``load`` as in :func:`attention_sample`)."""
    out: dict[str, Any] = {"recon": {}, "psnr": {}}
    for name, d in run_dirs.items():
        task, model = (load or load_trained)(Path(d))
        k = min(n, task.images["test"].shape[0])
        x, m, pred = task.predict(model, "test", list(range(k)))
        out.setdefault("original", x)
        out.setdefault("masked", apply_mask(x, m))
        out["recon"][name] = pred.clamp(0, 1)
        out["psnr"][name] = float(psnr(pred, x, mask=m))
    return out


def plot_inpainting(rows: dict[str, Any], path, *, names: Sequence[str] | None = None
                    ) -> list[Path]:
    """Rows: original, masked, then one row per model (titled with its PSNR on the missing
    pixels of these images); PNG and SVG."""
    names = list(names or rows["recon"])
    matplotlib, Figure, Canvas = mpl("attnlab.report.samples")
    panels = [("original", rows["original"]), ("masked input", rows["masked"])]
    panels += [(f"{n} ({rows['psnr'][n]:.1f} dB)", rows["recon"][n]) for n in names]
    k = rows["original"].shape[0]
    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 8}):
        fig = Figure(figsize=(1.0 * k + 1.8, 1.0 * len(panels)), layout="constrained")
        Canvas(fig)
        axes = fig.subplots(len(panels), k, squeeze=False)
        for r, (label, imgs) in enumerate(panels):
            for i in range(k):
                ax = axes[r][i]
                ax.imshow(imgs[i].permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(),
                          cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_ylabel(plain(label), rotation=0, ha="right", va="center")
        return save(fig, path)
