"""The base class of every mechanism: an ``nn.Module`` with the functional contract.

A subclass implements :meth:`Mechanism._attend` and receives inputs already validated
against the contract (see :mod:`attnlab.contract`) and its own registry flags, with
``scale`` resolved to a number and ``attn_mask`` (if any) viewed as 4-D (leading
broadcast dims of size 1 added, nothing expanded). Hyperparameters are validated once,
at construction, from the typed :class:`~attnlab.registry.HParam` list the mechanism
registered with, and are available as ``self.hp``.

Grouped-query heads (``enable_gqa=True``, ``k`` and ``v`` with fewer heads than ``q``) are
repeated to ``q``'s heads before :meth:`Mechanism._attend` (SDPA's ``repeat_interleave``),
unless the class sets ``native_gqa = True`` and takes them as they are.

A mechanism whose spec has ``key_padding`` but not ``arbitrary_mask`` receives only one
kind of mask: a bool key-padding mask, ``(B|1, H|1, 1, Nk|1)`` once 4-D (see
:func:`key_padding_keep`); any other mask is refused by the contract check.

Empty calls (``B``, ``H``, ``Nq`` or ``Nk`` of 0) never reach :meth:`Mechanism._attend`:
there is no (query, key) pair to score, so :meth:`Mechanism.forward` answers them for every
mechanism alike (:func:`empty_attention`), after the contract check and before the
mechanism's own checks (a module built for 8 heads takes ``H = 0``). Left to each
mechanism, blocked and bucketed ones divided by or reshaped with the zero size.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from attnlab.contract import check_inputs, is_key_padding_mask, repeat_kv_heads
from attnlab.registry import MechanismSpec

__all__ = ["SLICE_ELEMENTS", "Mechanism", "by_heads", "empty_attention", "head_slices",
           "is_key_padding_mask", "key_padding_keep"]

# Elements (16 MiB in float32) of the largest intermediate one slice of heads may make in
# by_heads: what the forward's peak is, above its output, rather than H times it.
SLICE_ELEMENTS = 1 << 22


def head_slices(B: int, H: int, per_head: int, budget: int | None = None) -> list[slice]:
    """Slices of the head dim with ``B * heads * per_head <= budget`` (one head at least;
    ``budget`` defaults to :data:`SLICE_ELEMENTS`, read at each call)."""
    budget = SLICE_ELEMENTS if budget is None else budget
    h = max(1, budget // max(1, B * per_head))
    return [slice(h0, min(h0 + h, H)) for h0 in range(0, H, h)]


def by_heads(fn, q, k, v, attn_mask, per_head: int) -> torch.Tensor:
    """``fn(q, k, v, attn_mask, heads)`` a few heads at a time, joined along the head dim.

    For mechanisms whose heads are independent: slicing changes nothing but the peak, as
    intermediates of ``per_head`` elements per (batch, head) then exist for one slice at a
    time. ``heads`` is the slice (for per-head parameters); one slice gets the inputs
    themselves. Without autograd the slices are written into one output (no concatenation
    copy); with it they are concatenated (a slice assignment's backward clones the whole
    gradient once per slice, and autograd keeps every slice's intermediates anyway).
    """
    B, H = q.shape[:2]
    slices = head_slices(B, H, per_head)
    if len(slices) == 1:
        return fn(q, k, v, attn_mask, slice(None))
    grad = torch.is_grad_enabled()
    outs, out = [], None
    for s in slices:
        m = attn_mask if attn_mask is None or attn_mask.shape[1] == 1 else attn_mask[:, s]
        o = fn(q[:, s], k[:, s], v[:, s], m, s)
        if grad:
            outs.append(o)
            continue
        if out is None:
            out = o.new_empty(B, H, *o.shape[2:])
        out[:, s] = o
    return torch.cat(outs, dim=1) if grad else out


def key_padding_keep(attn_mask: torch.Tensor | None, B: int, H: int, nk: int):
    """``(B, H, Nk)`` bool (an expanded view), ``True`` for the keys that may be attended,
    from the 4-D key-padding mask a padding-only mechanism receives; ``None`` if none."""
    if attn_mask is None:
        return None
    return attn_mask[:, :, 0, :].expand(B, H, nk)


def check_head_sizes(mech, q: torch.Tensor, sized: str = "its parameters") -> None:
    """A ``ValueError`` unless ``q``'s heads ``H`` and head dim ``D`` are the ``num_heads``
    and ``head_dim`` that ``mech`` sized ``sized`` with (where it has those hyperparameters)."""
    for name, got, what in (("num_heads", q.shape[1], "H heads of q"),
                            ("head_dim", q.shape[-1], "head dim D of q")):
        if name in mech.hp and got != mech.hp[name]:
            raise ValueError(f"{mech.spec.name}: {name}={mech.hp[name]} (the size of {sized}) "
                             f"does not match the {what}, {got}; build it with {name}={got}")


def empty_attention(q, k, v, need_weights: bool, params=()):
    """The result of a call with no (query, key) pair: ``(out, weights or None)``.

    ``out`` ``(B, H, Nq, Dv)`` is empty when ``B * H * Nq == 0`` and zeros when ``Nk == 0``
    (every query row is fully masked: the contract's zeros); weights ``(B, H, Nq, Nk)``
    likewise. Both are connected to ``q, k, v`` and ``params`` through the sum of an empty
    slice of each, an exact 0: backward gives zero (or empty) gradients instead of an error
    or ``None``, and no NaN even if an input holds inf.
    """
    B, H, Nq, _ = q.shape
    zero = sum(t.flatten()[:0].sum().to(q.dtype) for t in (q, k, v, *params))
    out = q.new_zeros(B, H, Nq, v.shape[-1]) + zero
    weights = q.new_zeros(B, H, Nq, k.shape[2]) + zero if need_weights else None
    return out, weights


class Mechanism(nn.Module):
    spec: ClassVar[MechanismSpec]
    # True: _attend takes k and v with fewer heads than q (enable_gqa) as they are; False:
    # forward repeats them to q's heads first.
    native_gqa: ClassVar[bool] = False

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        if not hasattr(type(self), "spec"):
            raise TypeError(f"{type(self).__name__} is not registered; decorate it with "
                            f"@register_mechanism")
        self.hp: dict[str, Any] = self.spec.validate_hparams(hparams)

    def default_scale(self, d: int) -> float:
        """Scale used when the caller passes ``scale=None`` (``1/sqrt(D)`` by default)."""
        return 1.0 / math.sqrt(d)

    def forward(
        self,
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
    ):
        """Attend; returns ``out`` ``(B, H, Nq, Dv)``, or ``(out, weights)`` if
        ``need_weights`` (weights ``(B, H, Nq, Nk)``). Everything after ``v`` is
        keyword-only, as in SDPA; ``enable_gqa`` lets ``k, v`` have fewer heads than ``q``."""
        check_inputs(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                     dropout_p=dropout_p, need_weights=need_weights, enable_gqa=enable_gqa,
                     spec=self.spec)
        # NumPy bools passed the check; the kernels below want Python's.
        is_causal, need_weights = bool(is_causal), bool(need_weights)
        if q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] == 0:
            out, weights = empty_attention(q, k, v, need_weights, tuple(self.parameters()))
            return (out, weights) if need_weights else out
        if not self.native_gqa:  # grouped-query heads: each k/v head serves its query heads
            k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])
        s = self.default_scale(q.shape[-1]) if scale is None else float(scale)
        if attn_mask is not None and attn_mask.dim() < 4:
            # A view with leading 1s: mechanisms only ever see 4-D masks.
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        out, weights = self._attend(q, k, v, attn_mask, is_causal, s, float(dropout_p),
                                    need_weights)
        return (out, weights) if need_weights else out

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        raise NotImplementedError

    # ------------------------------------------------------- decoding with a state
    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state=None, *,
               scale: float | None = None, enable_gqa: bool = False):
        """Causal decoding with the mechanism's own bounded state (spec ``decode_state``).

        ``q, k, v`` ``(B, H, n, D)`` are ``n >= 1`` new positions ``t .. t+n-1`` of one
        sequence, ``t`` the positions ``state`` has absorbed (``None``: none yet, ``t = 0``).
        Returns ``(out, new_state)``: ``out`` ``(B, H, n, Dv)`` equals rows ``t .. t+n-1``
        of the full causal forward over all ``t + n`` positions, and ``new_state`` carries
        what the next call needs, of a size that does not grow with ``t`` (a recurrent
        state ``S = sum phi(k) v^T``, or a rolling window of keys and values). ``state`` is
        not modified: the caller keeps or drops the returned one. No dropout, no mask.
        """
        if not self.spec.decode_state:
            raise ValueError(f"{self.spec.name} has no decoding state (registry flag "
                             f"decode_state); decode with attnlab.nn.KVCache if its spec has "
                             f"kv_cache, else recompute the causal forward")
        if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k)) \
                and q.shape[2] != k.shape[2]:
            raise ValueError(f"{self.spec.name}.decode: q, k and v are the same new positions;"
                             f" got Nq={q.shape[2]}, Nk={k.shape[2]}")
        check_inputs(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa,
                     spec=self.spec)
        if q.shape[0] * q.shape[1] * q.shape[2] == 0:
            raise ValueError(f"{self.spec.name}.decode: needs at least one new position, "
                             f"batch and head; got q {tuple(q.shape)}")
        if not self.native_gqa:
            k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])
        s = self.default_scale(q.shape[-1]) if scale is None else float(scale)
        return self._decode(q, k, v, state, s)

    def _decode(self, q, k, v, state, scale):
        """``(out, new_state)`` for :meth:`decode` (inputs checked, heads repeated)."""
        raise NotImplementedError

    # ------------------------------------------------------------ a hook for layers
    def length_projections(self, n: int):
        """``(E, F)``, each ``(r, n)``, when the mechanism's first step mixes keys and values
        along the length with one pair of matrices shared by every head (``E K``, ``F V``:
        Linformer); ``None``, the default, when it does not.

        Mixing along the length commutes with a layer's feature projection, ``E (X W) =
        (E X) W``, so a layer may mix its inputs instead and project ``r`` rows, not ``n``
        (:mod:`attnlab.nn.length_fold`), then call :meth:`attend_projected`.
        """
        return None

    def attend_projected(self, q, k_bar, v_bar, scale: float | None = None,
                         dropout_p: float = 0.0):
        """The rest of the forward pass, for keys and values already mixed along the length
        to ``(B, H, r, D)``: only for a mechanism whose :meth:`length_projections` is not
        ``None``."""
        raise NotImplementedError(f"{self.spec.name} mixes nothing along the length "
                                  f"(length_projections(n) is None); call the module itself")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hp.items())
