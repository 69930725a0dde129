"""The one functional contract every mechanism follows.

It is the contract of ``torch.nn.functional.scaled_dot_product_attention``:

* ``q``: ``(B, H, Nq, D)``, ``k``: ``(B, H, Nk, D)``, ``v``: ``(B, H, Nk, Dv)``;
  the output is ``(B, H, Nq, Dv)``. ``B`` and ``H`` must agree exactly between q, k, v,
  unless ``enable_gqa=True``: then ``k`` and ``v`` may have fewer heads, each a divisor of
  ``H``, and key/value head ``j`` serves query heads ``j*g .. j*g + g - 1`` (``g = H / Hk``,
  SDPA's ``repeat_interleave``; :func:`repeat_kv_heads`). Nothing is silently broadcast.
* Everything after ``v`` is keyword-only, as in :meth:`attnlab.Mechanism.forward`:
  ``forward(q, k, v, *, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0,
  need_weights=False, enable_gqa=False)``.
* ``attn_mask``: ``bool`` (``True`` = may attend) or floating (added to the scores, same
  dtype as ``q``), 2-D to 4-D and broadcastable to ``(B, H, Nq, Nk)`` by the usual rules:
  each of its trailing dimensions is 1 or the full size (a ``(Nq, Nk)`` mask is shared by
  every batch and head; a key-padding mask is ``(B, 1, 1, Nk)``).
* ``is_causal``: query ``i`` attends key ``j`` only if ``j <= i`` (top-left aligned, as in
  SDPA, also when ``Nq != Nk``). Unlike SDPA, attnlab lets ``is_causal`` and ``attn_mask``
  be combined: both must allow a pair.
* ``scale``: multiplies the scores; ``None`` means the mechanism's default
  (``1/sqrt(D)`` for scaled dot-product).
* ``dropout_p``: dropout on the attention weights (applied whenever ``> 0``, as in SDPA;
  modules pass 0 in eval mode).
* ``need_weights``: also return the ``(B, H, Nq, Nk)`` attention weights, for mechanisms
  that can.

**A fully masked query row** (no key allowed) gives an output row of zeros and weights of
zeros, never NaN, and zero gradient, the same as SDPA does in PyTorch >= 2.5.

**Empty inputs** are valid: ``B``, ``H`` or ``Nq`` of 0 gives an empty ``(B, H, Nq, Dv)``
output, and ``Nk = 0`` (every query row fully masked, as no key exists) gives zeros; both
stay connected to the inputs for autograd (see :class:`attnlab.mechanisms.base.Mechanism`).
Flags (``is_causal``, ``need_weights``, ``enable_gqa``) must be bools (NumPy's ``bool_``
too): a truthy string such as ``"no"`` is a ``TypeError``, never a silent ``True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnlab.util.checks import check_bool

__all__ = [
    "HALF_DTYPES",
    "AttentionInputs",
    "causal_mask",
    "check_inputs",
    "check_ids",
    "check_padding_mask",
    "is_key_padding_mask",
    "format_shape",
    "masked_softmax",
    "merge_masks",
    "repeat_kv_heads",
    "slice_mask",
    "work_dtype",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a mechanism computes in: float32 for half-precision inputs (their range
    and rounding are too coarse for exp, sums and inverses), else the inputs' own."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


@dataclass(frozen=True)
class AttentionInputs:
    """Validated shapes: batch, heads, query length, key length, head dims."""

    B: int
    H: int
    Nq: int
    Nk: int
    D: int
    Dv: int


def format_shape(t: torch.Tensor) -> str:
    """``(2, 8, 128, 64)``: a shape as error messages print it."""
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_ids(who: str, name: str, ids, vocab_size: int, max_len: int | None) -> None:
    """``ids`` must be a ``(B, N)`` LongTensor of ids in ``[0, vocab_size)``, ``N <= max_len``
    (``None``: no limit)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor of token ids; "
                        f"got {type(ids).__name__}")
    if ids.dtype != torch.long:
        raise TypeError(f"{who}: {name} must be a LongTensor (int64) of token ids; "
                        f"got dtype {ids.dtype}")
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"{who}: {name} must be 2-D (B, N) with B, N >= 1; "
                         f"got shape {format_shape(ids)}")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"{who}: {name} length {ids.shape[1]} exceeds max_len={max_len}")
    lo, hi = (int(x) for x in torch.aminmax(ids))  # one device sync, not two
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{who}: {name} must hold ids in [0, {vocab_size}) "
                         f"(vocab_size={vocab_size}); got values in [{lo}, {hi}]")


def check_padding_mask(who: str, name: str, mask, ids: torch.Tensor):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        what = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{who}: {name} must be a bool tensor (True = padding) or None; "
                        f"got {what}")
    if mask.shape != ids.shape:
        raise ValueError(f"{who}: {name} must have the ids' shape {format_shape(ids)}; "
                         f"got {format_shape(mask)}")
    return mask


def check_positions(who: str, name: str, positions, n: int, *,
                    high: int | None = None) -> torch.Tensor:
    """``positions`` ``(n,)``: the tokens' integer positions, in any order (a shard of a
    longer sequence, as context parallelism gives each rank), each in ``[0, high)``
    (``high=None``: no upper bound); returned as int64, else an error naming it."""
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int64,
                                                                          torch.int32):
        got = positions.dtype if isinstance(positions, torch.Tensor) else type(positions)
        raise TypeError(f"{who}: {name} must be an int64 (or int32) tensor; got {got}")
    low, top = (int(positions.min()), int(positions.max())) if positions.numel() else (0, 0)
    bound = f"[0, {high})" if high is not None else "[0, inf)"
    if positions.shape != (n,) or low < 0 or (high is not None and top >= high):
        raise ValueError(f"{who}: {name} must have shape ({n},), one per token, with values "
                         f"in {bound}; got shape {tuple(positions.shape)}, range "
                         f"[{low}, {top}]")
    return positions.long()


def is_key_padding_mask(mask) -> bool:
    """A bool mask that depends on the key alone: 2-D to 4-D with ``Nq`` dimension 1."""
    return (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
            and 2 <= mask.dim() <= 4 and mask.shape[-2] == 1)


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    enable_gqa: bool = False,
    spec=None,
) -> AttentionInputs:
    """Validate the contract; raise ``TypeError``/``ValueError`` naming the argument.

    ``spec`` (a :class:`~attnlab.registry.MechanismSpec`) adds the mechanism's own limits:
    causal, arbitrary masks, cross-attention, returning weights, half precision.
    """
    owner = spec.name if spec is not None else ""
    who = f"{owner}: " if owner else ""
    _check_tensors(q, k, v, who)
    check_bool("enable_gqa", enable_gqa, who=owner)
    sizes = _check_shapes(q, k, v, bool(enable_gqa), who)
    check_bool("is_causal", is_causal, who=owner)
    check_bool("need_weights", need_weights, who=owner)
    _check_scalars(scale, dropout_p, who)
    if attn_mask is not None:
        _check_mask(attn_mask, q, (sizes.B, sizes.H, sizes.Nq, sizes.Nk), who)
    if spec is not None:
        _check_spec(spec, q, sizes, attn_mask, is_causal, need_weights)
    return sizes


def _check_tensors(q, k, v, who: str) -> None:
    """Tensors of rank 4, floating, of q's dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            want = {"q": "(B, H, Nq, D)", "k": "(B, Hk, Nk, D)", "v": "(B, Hk, Nk, Dv)"}[name]
            raise ValueError(
                f"{who}{name} must be 4-D {want}; got {t.dim()}-D shape {format_shape(t)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{who}{name} must be a floating-point tensor; got dtype {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{who}{name} dtype {t.dtype} does not match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{who}{name} is on {t.device} but q is on {q.device}")


def _check_heads(name: str, q, t, enable_gqa: bool, who: str) -> None:
    """``t``'s heads: those of ``q``, or (``enable_gqa``) a divisor of them, as SDPA's."""
    H, h = q.shape[1], t.shape[1]
    if h == H:
        return
    shapes = f"(q {format_shape(q)}, {name} {format_shape(t)})"
    if not enable_gqa:
        hint = ("; pass enable_gqa=True for grouped-query heads" if h and H % h == 0
                else "")
        raise ValueError(f"{who}{name} has {h} heads but q has {H} {shapes}{hint}")
    if h == 0 or h > H or H % h:
        raise ValueError(f"{who}enable_gqa=True needs q's heads to be a multiple of {name}'s; "
                         f"got {H} query heads and {h} {name} heads {shapes}")


def _check_shapes(q, k, v, enable_gqa: bool, who: str) -> AttentionInputs:
    B, H, Nq, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != B:
            raise ValueError(
                f"{who}{name} batch size {t.shape[0]} does not match q batch size {B} "
                f"(q {format_shape(q)}, {name} {format_shape(t)})"
            )
        _check_heads(name, q, t, enable_gqa, who)
    if k.shape[-1] != D:
        raise ValueError(
            f"{who}k head dim {k.shape[-1]} does not match q head dim {D} "
            f"(q {format_shape(q)}, k {format_shape(k)})"
        )
    Nk = k.shape[2]
    if v.shape[2] != Nk:
        raise ValueError(
            f"{who}v length {v.shape[2]} does not match k length {Nk} "
            f"(k {format_shape(k)}, v {format_shape(v)})"
        )
    if D == 0 or v.shape[-1] == 0:
        raise ValueError(f"{who}head dims must be >= 1; got D={D}, Dv={v.shape[-1]}")
    return AttentionInputs(B, H, Nq, Nk, D, v.shape[-1])


def _check_scalars(scale, dropout_p, who: str) -> None:
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"{who}scale must be a float or None; got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"{who}scale must be a finite number > 0; got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{who}dropout_p must be a float; got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{who}dropout_p must be in [0, 1); got {dropout_p!r}")


def _check_spec(spec, q, sizes: AttentionInputs, attn_mask, is_causal, need_weights) -> None:
    """The mechanism's own limits, from its registry flags."""
    if is_causal and not spec.causal:
        raise ValueError(f"{spec.name} has no causal form; is_causal=True is not supported")
    # A padding-only mechanism (spec.key_padding) takes bool masks that depend on the key
    # alone (Nq dimension 1); every other mask needs spec.arbitrary_mask.
    if attn_mask is not None and not spec.arbitrary_mask and not (
            spec.key_padding and is_key_padding_mask(attn_mask)):
        raise ValueError(f"{spec.name} cannot take an arbitrary attn_mask; pass attn_mask=None")
    if sizes.Nq != sizes.Nk and not spec.cross:
        raise ValueError(
            f"{spec.name} needs Nq == Nk (self-attention); got Nq={sizes.Nq}, Nk={sizes.Nk}"
        )
    if need_weights and not spec.returns_weights:
        raise ValueError(
            f"{spec.name} cannot return attention weights (it never forms them); "
            f"use mechanism='reference' or 'sdpa' for need_weights=True"
        )
    if q.dtype in HALF_DTYPES and not spec.half_precision:
        raise TypeError(f"{spec.name} does not support {q.dtype}; use float32 or float64")


def repeat_kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, Hk, N, D) -> (B, heads, N, D)``: head ``j`` serves the ``heads // Hk`` query
    heads ``j * g ..``, as SDPA's ``enable_gqa`` (``repeat_interleave`` on the head dim).
    ``t`` itself when it has ``heads`` already."""
    h = t.shape[1]
    if h == heads:
        return t
    B, _, N, D = t.shape
    # expand is a view; the reshape copies once, as repeat_interleave(g, dim=1) does.
    return t[:, :, None].expand(B, h, heads // h, N, D).reshape(B, heads, N, D)


def _check_mask(mask, q: torch.Tensor, full: tuple[int, int, int, int], who: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{who}attn_mask must be a torch.Tensor or None; got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise TypeError(
                f"{who}attn_mask must be bool (True = may attend) or floating (additive); "
                f"got dtype {mask.dtype}"
            )
        if mask.dtype != q.dtype:
            raise TypeError(
                f"{who}float attn_mask dtype {mask.dtype} does not match q dtype {q.dtype}; "
                f"use attn_mask.to(q.dtype)"
            )
    if mask.device != q.device:
        raise ValueError(f"{who}attn_mask is on {mask.device} but q is on {q.device}")
    want = "(" + ", ".join(map(str, full)) + ")"
    if not 2 <= mask.dim() <= 4:
        raise ValueError(
            f"{who}attn_mask must be broadcastable to (B, H, Nq, Nk) = {want}; "
            f"got {mask.dim()}-D shape {format_shape(mask)}"
        )
    for got, n in zip(reversed(mask.shape), reversed(full[4 - mask.dim():]), strict=True):
        if got not in (1, n):
            raise ValueError(
                f"{who}attn_mask shape {format_shape(mask)} is not broadcastable to "
                f"(B, H, Nq, Nk) = {want}"
            )


def causal_mask(nq: int, nk: int, device=None) -> torch.Tensor:
    """``(Nq, Nk)`` bool, ``True`` where key ``j <= i`` (top-left aligned, as SDPA)."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()


def merge_masks(
    attn_mask: torch.Tensor | None, is_causal: bool, nq: int, nk: int, device=None
) -> torch.Tensor | None:
    """One mask holding both ``attn_mask`` and the causal constraint (bool or float)."""
    if not is_causal:
        return attn_mask
    c = causal_mask(nq, nk, device)
    if attn_mask is None:
        return c
    if attn_mask.dtype == torch.bool:
        return attn_mask & c
    return attn_mask.masked_fill(~c, float("-inf"))


def slice_mask(mask: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
    """Rows ``i0:i1`` and columns ``j0:j1`` of a broadcastable mask (size-1 dims kept)."""
    rows = slice(None) if mask.shape[-2] == 1 else slice(i0, i1)
    cols = slice(None) if mask.shape[-1] == 1 else slice(j0, j1)
    return mask[..., rows, cols]


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim with ``mask`` applied; fully masked rows give zeros.

    Computed in float32 at least (half-precision logits lose the max subtraction's
    accuracy), returned in the scores' dtype. Rows with no allowed key are zeroed
    *before* the exponent so neither the output nor the gradient sees a NaN.
    """
    work = scores.to(work_dtype(scores.dtype))
    if mask is not None:
        if mask.dtype == torch.bool:
            work = work.masked_fill(~mask, float("-inf"))
        else:
            work = work + mask.to(work.dtype)
    dead = torch.isneginf(work).all(dim=-1, keepdim=True)
    if dead.any():
        work = work.masked_fill(dead, 0.0)
        p = torch.softmax(work, dim=-1).masked_fill(dead, 0.0)
    else:
        p = torch.softmax(work, dim=-1)
    return p.to(scores.dtype)
