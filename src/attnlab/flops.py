"""Analytic FLOP models: the work a mechanism *needs*, not what a kernel happens to run.

A profiler such as :class:`torch.utils.flop_counter.FlopCounterMode` counts the matmuls it
sees: it misses ops it has no formula for (the in-place ``baddbmm_`` of ``flash``'s tiles,
so ``flash`` counted half of ``sdpa``'s forward on the same shape), and it counts the full
``Nq x Nk`` square for a causal call whether the kernel skips the masked half (SDPA's flash
kernel) or computes it and throws it away (``reference``). GFLOP/s and fractions of the
matmul roof divided by such counts compare nothing with anything. So a mechanism whose
work is known in closed form declares it in the registry
(``register_mechanism(flops="softmax_attention")`` or a callable), and the benchmark lab
uses that; the others keep the counter, whose matmul count is the work they do.

Conventions (the usual ones, e.g. the FlashAttention papers'):

* a multiply-add is 2 FLOPs; elementwise work (softmax, masking, scaling) is not counted;
* **forward** of softmax attention: ``Q K^T`` and ``P V``, ``2 Nq Nk D + 2 Nq Nk Dv`` per
  (batch, head), i.e. ``4 B H Nq Nk D`` when ``Dv = D``;
* **causal**: only the allowed pairs count, query ``i`` attending keys ``j <= i`` (top-left
  aligned, as :mod:`attnlab.contract`): ``sum_i min(i + 1, Nk)`` pairs instead of
  ``Nq Nk``, about half;
* **backward = 2 x forward** (``dQ``, ``dK``, ``dV`` and ``dP``: four matmuls against the
  forward's two), so ``fwd+bwd`` is 3 x forward. A kernel that recomputes the scores in
  its backward (``flash``) does more than that; the extra is not work the result needs.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["FLOP_MODELS", "PASS_FACTOR", "attention_pairs", "bilinear_attention_flops",
           "differential_attention_flops", "model_name", "resolve_flop_model",
           "softmax_attention_flops"]

#: Work of a pass in units of the forward's: backward counted as 2 x forward.
PASS_FACTOR = {"fwd": 1, "fwd+bwd": 3}

FlopModel = Callable[..., float]


def _size(where: str, name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int; got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{where}: {name} must be >= {low}; got {value}")
    return value


def attention_pairs(nq: int, nk: int, causal: bool) -> int:
    """How many (query, key) pairs attend: ``nq * nk``, or with ``causal`` (key ``j <= i``,
    top-left aligned) ``sum_{i < nq} min(i + 1, nk)``, in closed form."""
    nq = _size("attention_pairs", "nq", nq, 0)
    nk = _size("attention_pairs", "nk", nk, 0)
    if not isinstance(causal, bool):
        raise TypeError(f"attention_pairs: causal must be a bool; got {causal!r}")
    if not causal:
        return nq * nk
    full = min(nq, nk)  # rows 0 .. full-1 see i + 1 keys; later rows see all nk
    return full * (full + 1) // 2 + (nq - full) * nk


def _checked(where: str, B, H, Nq, Nk, D, Dv, causal, pass_) -> tuple[int, int]:
    """(pairs, pass factor) after checking every argument (a clear error names it)."""
    for name, value in (("B", B), ("H", H), ("D", D), ("Dv", Dv)):
        _size(where, name, value)
    if pass_ not in PASS_FACTOR:
        raise ValueError(f"{where}: pass_ must be one of {list(PASS_FACTOR)}; got {pass_!r}")
    return attention_pairs(Nq, Nk, causal), PASS_FACTOR[pass_]


def softmax_attention_flops(*, B: int, H: int, Nq: int, Nk: int, D: int, Dv: int | None = None,
                            causal: bool = False, pass_: str = "fwd",
                            hparams: dict | None = None) -> float:
    """``softmax(Q K^T * scale + M) V``: ``2 B H pairs (D + Dv)`` forward (``Q K^T`` and
    ``P V``), times 3 for ``fwd+bwd`` (backward = 2 x forward). ``Dv`` defaults to ``D``;
    ``hparams`` (tile sizes, precision) do not change the work."""
    Dv = D if Dv is None else Dv
    pairs, factor = _checked("softmax_attention_flops", B, H, Nq, Nk, D, Dv, causal, pass_)
    return float(factor * 2 * B * H * pairs * (D + Dv))


def bilinear_attention_flops(*, B: int, H: int, Nq: int, Nk: int, D: int,
                             Dv: int | None = None, causal: bool = False, pass_: str = "fwd",
                             hparams: dict | None = None) -> float:
    """Luong's ``general`` score ``q^T W_a k``: softmax attention plus ``q W_a`` (``D x D``,
    ``2 B H Nq D^2``) forward, all of it times 3 for ``fwd+bwd``."""
    Dv = D if Dv is None else Dv
    _, factor = _checked("bilinear_attention_flops", B, H, Nq, Nk, D, Dv, causal, pass_)
    attention = softmax_attention_flops(B=B, H=H, Nq=Nq, Nk=Nk, D=D, Dv=Dv, causal=causal,
                                        pass_=pass_)
    return attention + float(factor * 2 * B * H * Nq * D * D)


def differential_attention_flops(*, B: int, H: int, Nq: int, Nk: int, D: int,
                                 Dv: int | None = None, causal: bool = False,
                                 pass_: str = "fwd", hparams: dict | None = None) -> float:
    """Differential attention (Ye et al. 2024): two softmax maps, each scoring with half the
    head (``Q_i K_i^T`` over ``D / 2``) and each applied to the full ``V`` (``Dv``), so
    ``2 B H pairs (D + 2 Dv)`` forward, times 3 for ``fwd+bwd``. The kernel zero-pads
    ``Q_i, K_i`` to ``Dv`` for PyTorch's fused path; those zeros are not work the result
    needs (a profiler counts them, and so read the mechanism above the matmul roof).
    ``lambda`` and the RMSNorm are elementwise."""
    Dv = D if Dv is None else Dv
    _checked("differential_attention_flops", B, H, Nq, Nk, D, Dv, causal, pass_)
    if D % 2:
        raise ValueError(f"differential_attention_flops: D must be even (Q and K split into "
                         f"halves); got {D}")
    return 2 * softmax_attention_flops(B=B, H=H, Nq=Nq, Nk=Nk, D=D // 2, Dv=Dv,
                                       causal=causal, pass_=pass_)


#: Models a mechanism names in ``register_mechanism(flops=NAME)``.
FLOP_MODELS: dict[str, FlopModel] = {
    "softmax_attention": softmax_attention_flops,
    "bilinear_attention": bilinear_attention_flops,
    "differential_attention": differential_attention_flops,
}


def resolve_flop_model(model: str | FlopModel | None, owner: str) -> FlopModel | None:
    """``register_mechanism(flops=...)``: a name from :data:`FLOP_MODELS`, a callable
    ``f(*, B, H, Nq, Nk, D, Dv, causal, pass_, hparams) -> float``, or None (the
    benchmark lab then counts with ``FlopCounterMode``)."""
    if model is None or (callable(model) and not isinstance(model, str)):
        return model
    if isinstance(model, str):
        if model not in FLOP_MODELS:
            raise ValueError(f"register_mechanism({owner!r}): unknown FLOP model {model!r}; "
                             f"known: {sorted(FLOP_MODELS)} (or pass a callable)")
        return FLOP_MODELS[model]
    raise TypeError(f"register_mechanism({owner!r}): flops must be a model name, a callable "
                    f"or None; got {type(model).__name__} {model!r}")


def model_name(model: FlopModel) -> str:
    """The name a stored point gives its FLOP model: its key in :data:`FLOP_MODELS`, else
    the callable's own name."""
    for name, m in FLOP_MODELS.items():
        if m is model:
            return name
    return getattr(model, "__name__", type(model).__name__)
