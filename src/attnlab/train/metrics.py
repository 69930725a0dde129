r"""Evaluation metrics: pure functions on tensors or arrays, no scikit-learn at run time.

Classification (``accuracy``, ``confusion_matrix``, ``per_class_f1``, ``macro_f1``) follows
scikit-learn's conventions, so numbers agree with ``sklearn.metrics``; language modelling
has ``perplexity``; inpainting has ``psnr`` and ``ssim`` (Wang et al. 2004); training
curves have ``convergence`` (``steps_to_fraction`` on a run's ``metrics.jsonl`` rows);
repeated runs have ``mean_std``.

Inputs may be torch tensors, NumPy arrays or lists; scalars come back as Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as nnf

from attnlab import stats

__all__ = [
    "Convergence",
    "accuracy",
    "confusion_matrix",
    "convergence",
    "macro_f1",
    "mean_std",
    "per_class_f1",
    "perplexity",
    "psnr",
    "ssim",
    "steps_to_fraction",
]


def _tensor(name: str, x, who: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{who}: {name} must be a tensor, array or list; "
                        f"got {type(x).__name__}") from e


def _labels(preds, targets, who: str, num_classes: int | None = None):
    p, t = _tensor("preds", preds, who), _tensor("targets", targets, who)
    if p.numel() == 0 or t.numel() == 0:
        raise ValueError(f"{who}: preds and targets must not be empty; got {p.numel()} and "
                         f"{t.numel()} elements")
    for name, x in (("preds", p), ("targets", t)):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{who}: {name} must hold integer class ids; got dtype {x.dtype}")
    p, t = p.reshape(-1).long(), t.reshape(-1).long()
    if p.numel() != t.numel():
        raise ValueError(f"{who}: preds and targets must have the same number of elements; "
                         f"got {p.numel()} and {t.numel()}")
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"{who}: num_classes must be an int >= 1; got {num_classes!r}")
        for name, x in (("preds", p), ("targets", t)):
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"{who}: {name} must be class ids in [0, {num_classes}); got "
                                 f"values in [{lo}, {hi}]")
    return p, t


def accuracy(logits_or_preds, targets) -> float:
    """Fraction of correct predictions. ``logits_or_preds`` is either class ids shaped like
    ``targets``, or scores with one more (last) dimension, reduced by ``argmax``."""
    x, t = _tensor("logits_or_preds", logits_or_preds, "accuracy"), _tensor(
        "targets", targets, "accuracy")
    if x.dim() == t.dim() + 1:
        x = x.argmax(dim=-1)
    elif x.shape != t.shape:
        raise ValueError(f"accuracy: logits_or_preds must be shaped like targets {tuple(t.shape)}"
                         f" (class ids) or {(*t.shape, 'C')} (scores); got {tuple(x.shape)}")
    p, t = _labels(x, t, "accuracy")
    return float((p == t).double().mean())


def confusion_matrix(preds, targets, num_classes: int) -> torch.Tensor:
    """``(C, C)`` int64 counts; row = true class, column = predicted (sklearn's layout)."""
    p, t = _labels(preds, targets, "confusion_matrix", num_classes)
    flat = torch.bincount(t * num_classes + p, minlength=num_classes ** 2)
    return flat.view(num_classes, num_classes)


def per_class_f1(preds, targets, num_classes: int) -> torch.Tensor:
    r"""F1 of each class, float64 ``(C,)``: :math:`F_1 = 2TP / (2TP + FP + FN)`.

    A class absent from both ``preds`` and ``targets`` has ``0/0``; it gets 0, scikit-learn's
    ``f1_score(..., labels=range(C), average=None, zero_division=0)``.
    """
    return _f1(confusion_matrix(preds, targets, num_classes))[0]


def _f1(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class F1 from a confusion matrix, and which classes occur at all."""
    cm = cm.double()
    tp = cm.diagonal()
    denom = cm.sum(0) + cm.sum(1)  # (TP + FP) + (TP + FN)
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp)), denom > 0


def macro_f1(preds, targets, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in ``preds`` or
    ``targets``.

    Convention (scikit-learn's ``f1_score(targets, preds, average="macro", zero_division=0)``
    with its default ``labels``): a class absent from both has no defined F1 and is left out
    of the mean, rather than counted as 0 (which would penalise a model for an evaluation
    set that lacks a class). A class that occurs only in ``targets`` (never predicted) or
    only in ``preds`` has F1 = 0 and counts.
    """
    f1, present = _f1(confusion_matrix(preds, targets, num_classes))
    return float(f1[present].mean())


def perplexity(total_nll: float, total_tokens: int) -> float:
    r""":math:`\exp(\text{total\_nll} / \text{total\_tokens})`, the exponentiated mean
    negative log-likelihood (natural log) per token. Returns ``inf`` instead of overflowing
    (mean NLL above ~709.78) and ``nan`` for a ``nan`` NLL (a diverged run is reported, not
    raised)."""
    nll = float(total_nll.item() if isinstance(total_nll, torch.Tensor) else total_nll)
    if isinstance(total_tokens, torch.Tensor):
        total_tokens = total_tokens.item()
    if isinstance(total_tokens, bool) or not isinstance(total_tokens, (int, float)) or not (
            total_tokens > 0):
        raise ValueError(f"perplexity: total_tokens must be > 0; got {total_tokens!r}")
    if math.isnan(nll):
        return math.nan
    if nll < 0:
        raise ValueError(f"perplexity: total_nll must be >= 0 (a sum of -log p); got {nll!r}")
    try:
        return math.exp(nll / total_tokens)
    except OverflowError:  # float64 exp overflows above a mean NLL of ~709.78 nats
        return math.inf


def _images(pred, target, who: str):
    p, t = _tensor("pred", pred, who), _tensor("target", target, who)
    if p.shape != t.shape:
        raise ValueError(f"{who}: pred {tuple(p.shape)} and target {tuple(t.shape)} must have "
                         f"the same shape")
    if p.dim() < 2 or p.shape[0] == 0:
        raise ValueError(f"{who}: expected a batch of images (N, ...); got {tuple(p.shape)}")
    return p.double(), t.double()


def _range(data_range, who: str) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not (
            data_range > 0 and math.isfinite(data_range)):
        raise ValueError(f"{who}: data_range must be a finite number > 0; got {data_range!r}")
    return float(data_range)


def _reduce(per_image: torch.Tensor, reduction: str, who: str):
    if reduction == "none":
        return per_image
    if reduction == "mean":
        return float(per_image.mean())
    raise ValueError(f"{who}: reduction must be 'mean' or 'none'; got {reduction!r}")


def psnr(pred, target, mask=None, data_range: float = 1.0, reduction: str = "mean",
         max_db: float | None = None):
    r"""Peak signal-to-noise ratio in dB, per image, then averaged over the batch:
    :math:`10 \log_{10}(L^2 / \mathrm{MSE})`, ``L = data_range``, the MSE over all of an
    image's values (channels included).

    ``mask`` (bool, broadcastable to ``pred``, ``True`` = missing pixel) restricts each
    image's MSE to the missing pixels, the ones an inpainter predicted; images with no
    missing pixel are left out of the mean (``nan`` with ``reduction="none"``).

    Identical images give ``+inf`` by default, and a mean with one ``inf`` is ``inf``.
    ``max_db`` caps each image's value first (e.g. 100 dB): on MNIST-like data a hole over
    plain background can be filled almost exactly, and one such image would otherwise
    dominate or overflow the mean. ``reduction="none"`` returns the float64 ``(N,)``
    per-image values.
    """
    p, t = _images(pred, target, "psnr")
    L = _range(data_range, "psnr")
    sq = (p - t).square()
    if mask is None:
        mse = sq.flatten(1).mean(1)
    else:
        m = _tensor("mask", mask, "psnr")
        if m.dtype != torch.bool:
            raise TypeError(f"psnr: mask must be bool (True = missing); got dtype {m.dtype}")
        try:
            m = m.expand_as(p).double()
        except RuntimeError as e:
            raise ValueError(f"psnr: mask {tuple(m.shape)} does not broadcast to pred "
                             f"{tuple(p.shape)}") from e
        count = m.flatten(1).sum(1)
        mse = torch.where(count > 0, (sq * m).flatten(1).sum(1) / count.clamp_min(1), math.nan)
        if reduction == "mean" and not bool((count > 0).any()):
            raise ValueError("psnr: mask has no missing pixel in any image")
    per_image = 10 * torch.log10(L ** 2 / mse)  # mse = 0 -> L^2 / 0 = inf -> inf dB
    if max_db is not None:
        if isinstance(max_db, bool) or not isinstance(max_db, (int, float)) or math.isnan(max_db):
            raise ValueError(f"psnr: max_db must be a number or None; got {max_db!r}")
        per_image = per_image.clamp(max=float(max_db))  # nan (no missing pixel) stays nan
    if reduction == "mean":
        per_image = per_image[~per_image.isnan()]
    return _reduce(per_image, reduction, "psnr")


def _window(kind: str, size: int, sigma: float) -> torch.Tensor:
    """1-D normalised window of odd length ``size`` (the 2-D window is its outer product)."""
    if kind == "uniform":
        return torch.full((size,), 1.0 / size, dtype=torch.float64)
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred, target, data_range: float = 1.0, window: str = "gaussian",
         win_size: int | None = None, sigma: float = 1.5, reduction: str = "mean"):
    r"""Mean structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004), per image then
    averaged over the batch. Images are ``(N, H, W)`` or ``(N, C, H, W)`` (channels averaged).

    .. math:: \mathrm{SSIM}(x, y) = \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
        {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)}, \quad
        C_1 = (K_1 L)^2,\ C_2 = (K_2 L)^2,\ K_1 = 0.01,\ K_2 = 0.03,

    with local statistics over a sliding window, averaged over every position where the
    window fits entirely inside the image (no padding; the paper's "valid" filtering).

    Window (``window``, ``win_size``):

    * ``"gaussian"`` (default): the paper's 11x11 circular-symmetric Gaussian, standard
      deviation ``sigma = 1.5``, normalised to sum 1 (its eqs. 14-16, weighted moments).
    * ``"uniform"``: a ``7x7`` box (scikit-image's default), with the paper's unbiased
      sample (co)variances (its eq. 4, divide by ``n - 1``), as scikit-image computes them.

    ``win_size=None`` takes 11 (gaussian) or 7 (uniform), shrunk to the largest odd size
    that fits the image: 7 on 8x8 digits (the Gaussian keeps ``sigma``, truncated to the
    smaller support and renormalised). An explicit odd ``win_size`` larger than the image
    raises. Sides smaller than 3 pixels raise: a 1-pixel window has no variance.
    """
    who = "ssim"
    p, t = _images(pred, target, who)
    L = _range(data_range, who)
    if p.dim() == 3:
        p, t = p[:, None], t[:, None]
    if p.dim() != 4:
        raise ValueError(f"{who}: pred must be (N, H, W) or (N, C, H, W); got {tuple(p.shape)}")
    N, C, H, W = p.shape
    if window not in ("gaussian", "uniform"):
        raise ValueError(f"{who}: window must be 'gaussian' or 'uniform'; got {window!r}")
    if min(H, W) < 3:
        raise ValueError(f"{who}: images must be at least 3x3; got {H}x{W}")
    if win_size is None:
        win_size = min(11 if window == "gaussian" else 7, min(H, W) - (1 - min(H, W) % 2))
    elif isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or (
            win_size % 2 == 0):
        raise ValueError(f"{who}: win_size must be an odd int >= 3; got {win_size!r}")
    elif win_size > min(H, W):
        raise ValueError(f"{who}: win_size={win_size} is larger than the images ({H}x{W}); "
                         f"use win_size <= {min(H, W)} or None")
    if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma > 0):
        raise ValueError(f"{who}: sigma must be a number > 0; got {sigma!r}")
    g = _window(window, win_size, float(sigma))
    k2 = (g[:, None] * g[None, :])[None, None]  # (1, 1, s, s)

    def filt(z):  # weighted local mean over every valid window position
        return nnf.conv2d(z.reshape(N * C, 1, H, W), k2)

    mx, my = filt(p), filt(t)
    vx, vy, cxy = filt(p * p) - mx ** 2, filt(t * t) - my ** 2, filt(p * t) - mx * my
    if window == "uniform":  # unbiased sample (co)variance, eq. 4
        n = win_size ** 2
        vx, vy, cxy = (v * (n / (n - 1)) for v in (vx, vy, cxy))
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    per_image = smap.reshape(N, -1).mean(1)
    return _reduce(per_image, reduction, who)


class Convergence(NamedTuple):
    """Where a curve first reached its threshold: training ``step`` and wall ``time``."""

    step: int
    time: float


def convergence(steps: Sequence, times: Sequence, values: Sequence, *, mode: str = "max",
                fraction: float = 0.95, reference: float | None = None) -> Convergence | None:
    """First ``(step, time)`` at which a metric curve gets within ``fraction`` of the best.

    ``mode="max"`` (accuracy, PSNR): the first point with ``value >= fraction * best``.
    ``mode="min"`` (loss, perplexity): the first with ``value <= best / fraction``.
    ``best`` is the best value in ``values`` (NaNs ignored), or ``reference`` when given,
    e.g. the best over several runs, to compare how fast each gets there. Returns ``None``
    when no point qualifies (empty or all-NaN curve, or a ``reference`` never reached).

    The thresholds assume non-negative metrics (a fraction of a negative best would be
    above it); a negative best raises ``ValueError``.
    """
    who = "convergence"
    if mode not in ("max", "min"):
        raise ValueError(f"{who}: mode must be 'max' or 'min'; got {mode!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            0 < fraction <= 1):
        raise ValueError(f"{who}: fraction must be in (0, 1]; got {fraction!r}")
    s, tm, v = (list(_tensor(n, x, who).reshape(-1).tolist()) if not isinstance(x, list)
                else list(x) for n, x in (("steps", steps), ("times", times), ("values", values)))
    if not len(s) == len(tm) == len(v):
        raise ValueError(f"{who}: steps, times and values must have the same length; got "
                         f"{len(s)}, {len(tm)}, {len(v)}")
    finite = [float(x) for x in v if not math.isnan(float(x))]
    if reference is None and not finite:
        return None
    best = float(reference) if reference is not None else (max(finite) if mode == "max"
                                                            else min(finite))
    if best < 0 or math.isnan(best):
        raise ValueError(f"{who}: the best value must be >= 0 for a fraction of it to make "
                         f"sense; got {best!r} (mode={mode!r})")
    for step, time, x in zip(s, tm, v, strict=True):
        x = float(x)
        if math.isnan(x):
            continue
        if (mode == "max" and x >= fraction * best) or (mode == "min" and x * fraction <= best):
            return Convergence(int(step), float(time))
    return None


def steps_to_fraction(history: Sequence[dict], key: str, *, mode: str = "max",
                      fraction: float = 0.95) -> int | None:
    """The first evaluated step at which ``key`` (e.g. ``"val_accuracy"``) is within
    ``fraction`` of the run's own best: :func:`convergence` on ``history``, the rows of a
    run's ``metrics.jsonl`` (dicts with ``step``, one per evaluation). ``None`` when no
    row qualifies; a ``ValueError`` when no row has ``key`` (a misspelt name)."""
    rows = [r for r in history if key in r]
    if not rows:
        known = sorted({k for r in history for k in r})
        raise ValueError(f"steps_to_fraction: no row of the history has {key!r} "
                         f"(keys: {known})")
    got = convergence([r["step"] for r in rows], [float(r.get("time_s", 0.0)) for r in rows],
                      [r[key] for r in rows], mode=mode, fraction=fraction)
    return None if got is None else got.step


def mean_std(values) -> tuple[float, float]:
    """``(mean, sample standard deviation)`` (divide by ``n - 1``) of a sequence of numbers;
    a single value has std 0. Empty input raises."""
    x = _tensor("values", values, "mean_std").reshape(-1).double().tolist()
    if not x:
        raise ValueError("mean_std: values is empty")
    s = stats.std(x)
    return stats.mean(x), 0.0 if s is None else s
