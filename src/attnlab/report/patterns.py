"""Attention figures for the report: sparsity patterns and attention heat maps.

A structured mechanism attends query ``i`` to the keys of a set ``S_i``:

.. math::

    \\mathrm{out}_i = \\mathrm{softmax}_{j \\in S_i}(\\tau\\, q_i \\cdot k_j)\\, v_j

:func:`sparsity_pattern` returns ``S`` as an ``(n, n)`` bool matrix, taken from the
mechanism itself and never re-implemented here, by one of two methods:

* ``"predicate"`` (the sparse family): the mechanism's own
  :meth:`~attnlab.mechanisms._engines.sparse_flex.SparseMechanism.pattern` evaluated through
  :func:`attnlab.mechanisms._engines.blocksparse.allows`, the token predicate both of its backends
  apply inside the blocks they score (the block layout is only a superset of it);
* ``"empirical"`` (any structured mechanism): run it on ``q = k = 0`` and ``v = I_n``
  (``Dv = n``). Every score is 0, so the softmax over ``S_i`` is uniform and
  ``out[i, j] = 1/|S_i|`` for ``j`` in ``S_i``, exactly 0 otherwise (a masked key gets
  ``exp(-inf) = 0``; ``1/|S_i| >= 1/n`` cannot underflow): ``S = (out != 0)``. A query with
  no allowed key gives a zero row, which is the contract's fully masked row.

``"auto"`` takes the predicate where the mechanism has one, else the empirical method.
"Structured" means the sparse family plus the exact, parameter-free mechanisms (``sdpa``,
``reference``, ...), whose pattern is full, or causal ``j <= i`` with ``causal=True``.
Mechanisms that approximate or learn their weights (kernel, low-rank, hashing, ...) have
no fixed pattern and are refused.

matplotlib is optional (the ``viz`` extra) and imported only when a figure is drawn; as in
:mod:`attnlab.bench.plots`, figures use ``matplotlib.figure.Figure`` on an Agg canvas, never
``pyplot``, and SVG text stays text (searchable titles and labels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from attnlab import registry
from attnlab.mechanisms._engines.blocksparse import allows
from attnlab.mechanisms._engines.sparse_flex import SparseMechanism
from attnlab.report.figures import mpl, plain, save

__all__ = ["METHODS", "empirical_pattern", "plot_attention", "plot_attention_grid", "plot_patterns",
           "predicate_pattern", "sparsity_pattern", "structured_mechanisms"]

METHODS = ("auto", "predicate", "empirical")
_RC = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 9}


def structured_mechanisms() -> list[str]:
    """Sorted names :func:`sparsity_pattern` accepts: the sparse family and the exact,
    parameter-free mechanisms (softmax over every key, or every past key when causal) that
    can be built alone (``hybrid`` needs its layer's head count: its heads differ)."""
    def alone(s):
        return not any(h.default is registry.REQUIRED for h in s.hparams)

    return [n for n in registry.list_mechanisms()
            if registry.get(n).family == "sparse"
            or (registry.get(n).exact and not registry.get(n).learnable
                and alone(registry.get(n)))]


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sparsity_pattern: n must be an int >= 1; got {type(n).__name__} {n!r}")
    return n


def predicate_pattern(mech: SparseMechanism, n: int, causal: bool = False) -> torch.Tensor:
    """``(n, n)`` bool: the sparse mechanism's own token predicate at length ``n``."""
    if not isinstance(mech, SparseMechanism):
        raise TypeError(f"predicate_pattern: mech must be a sparse-family mechanism; got "
                        f"{type(mech).__name__}")
    rule = mech.pattern(_check_n(n), bool(causal)).rule()
    i = torch.arange(n)
    return allows(rule, i.unsqueeze(1), i.unsqueeze(0))


@torch.no_grad()
def empirical_pattern(mech: torch.nn.Module, n: int, causal: bool = False) -> torch.Tensor:
    """``(n, n)`` bool: the keys that reach each output row with ``q = k = 0``, ``v = I_n``.

    Exact for any mechanism that is a softmax over a key set (see the module docstring).
    """
    n = _check_n(n)
    q = torch.zeros(1, 1, n, 2)  # D = 2: small, and every score is 0 whatever D is
    v = torch.eye(n).reshape(1, 1, n, n)
    out = mech(q, q.clone(), v, is_causal=bool(causal))
    return (out[0, 0] != 0).cpu()


def sparsity_pattern(name: str, n: int, *, causal: bool = False, method: str = "auto",
                     **hparams) -> torch.Tensor:
    """``(n, n)`` bool, ``[i, j]`` True if query ``i`` may attend key ``j``.

    ``name`` is a structured mechanism (:func:`structured_mechanisms`, aliases allowed),
    ``hparams`` its hyperparameters (e.g. ``window=4, block_size=4``; the registered
    defaults otherwise), ``causal`` the call's ``is_causal``. ``method``: ``"auto"``,
    ``"predicate"`` (sparse family only) or ``"empirical"``; see the module docstring.
    """
    canonical = registry.resolve_name(name)  # unknown: ValueError with close matches
    if canonical not in structured_mechanisms():
        spec = registry.get(canonical)
        raise ValueError(
            f"sparsity_pattern: mechanism {canonical!r} ({spec.family} family) has no fixed "
            f"attention pattern; expected one of {', '.join(structured_mechanisms())}")
    if method not in METHODS:
        raise ValueError(f"sparsity_pattern: method must be one of {list(METHODS)}; got "
                         f"{method!r}")
    n = _check_n(n)
    mech = registry.create(canonical, **hparams)
    if method == "empirical" or (method == "auto" and not isinstance(mech, SparseMechanism)):
        return empirical_pattern(mech, n, causal)
    if not isinstance(mech, SparseMechanism):
        raise ValueError(f"sparsity_pattern: method 'predicate' needs a sparse-family "
                         f"mechanism; {canonical!r} has none (use 'empirical' or 'auto')")
    return predicate_pattern(mech, n, causal)


# ------------------------------------------------------------------------------ figures
def _grid(k: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(k, max_cols)
    return math.ceil(k / cols), cols


def plot_patterns(patterns: Mapping[str, torch.Tensor], path) -> list[Path]:
    """Small multiples of ``(n, n)`` masks (``[i, j]`` nonzero = query i may attend key j),
    each titled with its name and density (fraction of pairs allowed); writes ``path``
    as PNG and SVG and returns both paths."""
    if not isinstance(patterns, Mapping) or not patterns:
        raise ValueError(f"plot_patterns: patterns must be a non-empty dict name -> (n, n) "
                         f"mask; got {patterns!r:.80}")
    masks = {}
    for name, m in patterns.items():
        m = torch.as_tensor(m).detach().cpu()
        if m.dim() != 2:
            raise ValueError(f"plot_patterns: pattern {name!r} must be 2-D (Nq, Nk); got shape "
                             f"{tuple(m.shape)}")
        masks[name] = m != 0
    matplotlib, Figure, Canvas = mpl("attnlab.report.patterns")
    rows, cols = _grid(len(masks))
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(2.6 * cols, 2.9 * rows), layout="constrained")
        Canvas(fig)
        for idx, (name, m) in enumerate(masks.items()):
            ax = fig.add_subplot(rows, cols, idx + 1)
            ax.imshow(m.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            density = m.float().mean().item() if m.numel() else 0.0
            ax.set_title(f"{plain(name)}\ndensity {density:.1%}")
            ax.set_xlabel("key j")
            ax.set_ylabel("query i")
        return save(fig, path)


def plot_attention(tokens: Sequence[str], weights, path, *, title: str) -> list[Path]:
    """One heat map per head of ``weights`` ``(H, N, N)`` plus their mean, with ``tokens``
    (length N) as axis labels (keys rotated below, queries on the left), one colour scale;
    writes ``path`` as PNG and SVG and returns both paths."""
    w = torch.as_tensor(weights).detach().cpu().float()
    if w.dim() != 3 or w.shape[1] != w.shape[2]:
        raise ValueError(f"plot_attention: weights must be (H, N, N); got shape "
                         f"{tuple(w.shape)}")
    H, N = w.shape[0], w.shape[1]
    if len(tokens) != N:
        raise ValueError(f"plot_attention: tokens must have N={N} entries (weights "
                         f"{tuple(w.shape)}); got {len(tokens)}")
    if H < 1 or N < 1:
        raise ValueError(f"plot_attention: weights must not be empty; got shape {tuple(w.shape)}")
    labels = [plain(t) for t in tokens]
    panels = [(f"head {h}", w[h]) for h in range(H)] + [("mean of heads", w.mean(0))]
    matplotlib, Figure, Canvas = mpl("attnlab.report.patterns")
    rows, cols = _grid(len(panels))
    side = max(2.8, 0.16 * N)  # room for N labels at a readable size
    fs = max(4.0, min(8.0, 220.0 / N))
    vmax = max(float(w.max()), 1e-12)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(side * cols, (side + 0.4) * rows), layout="constrained")
        Canvas(fig)
        im = None
        for idx, (name, m) in enumerate(panels):
            ax = fig.add_subplot(rows, cols, idx + 1)
            im = ax.imshow(m.numpy(), cmap="viridis", vmin=0.0, vmax=vmax,
                           interpolation="nearest")
            ax.set_title(name)
            ax.set_xticks(range(N), labels, rotation=90, fontsize=fs)
            ax.set_yticks(range(N), labels if idx % cols == 0 else [""] * N, fontsize=fs)
            ax.tick_params(length=2)
        fig.suptitle(title)
        fig.colorbar(im, ax=fig.axes, shrink=0.6, label="attention weight")
        return save(fig, path)


def plot_attention_grid(tokens: Sequence[str], maps: Mapping[str, torch.Tensor], path, *,
                        title: str) -> list[Path]:
    """Small multiples: one ``(N, N)`` heat map per name (e.g. each mechanism's mean over
    heads for the same input), ``tokens`` as labels on the outer panels, each panel on its
    own colour scale (their ranges differ: a sparse map is peaked, a kernel map is flat)."""
    if not isinstance(maps, Mapping) or not maps:
        raise ValueError("plot_attention_grid: maps must be a non-empty dict name -> (N, N)")
    N = len(tokens)
    ws = {}
    for name, m in maps.items():
        w = torch.as_tensor(m).detach().cpu().float()
        if tuple(w.shape) != (N, N):
            raise ValueError(f"plot_attention_grid: map {name!r} must be (N, N) = ({N}, {N}) "
                             f"for {N} tokens; got {tuple(w.shape)}")
        ws[name] = w
    labels = [plain(t) for t in tokens]
    matplotlib, Figure, Canvas = mpl("attnlab.report.patterns")
    rows, cols = _grid(len(ws), max_cols=5)
    side = max(2.4, 0.11 * N)
    fs = max(3.5, min(7.0, 160.0 / N))
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(side * cols, (side + 0.3) * rows), layout="constrained")
        Canvas(fig)
        for idx, (name, w) in enumerate(ws.items()):
            ax = fig.add_subplot(rows, cols, idx + 1)
            ax.imshow(w.numpy(), cmap="viridis", vmin=0.0, interpolation="nearest")
            ax.set_title(plain(name))
            last_row = idx >= len(ws) - cols
            ax.set_xticks(range(N), labels if last_row else [""] * N, rotation=90, fontsize=fs)
            ax.set_yticks(range(N), labels if idx % cols == 0 else [""] * N, fontsize=fs)
            ax.tick_params(length=1.5)
        fig.suptitle(title)
        return save(fig, path)
