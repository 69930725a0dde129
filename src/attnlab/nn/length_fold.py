"""Linformer's length fold in a layer: mix the key/value *inputs* along the length first.

A mechanism whose first step mixes keys and values along the length with one pair of
``(r, n)`` matrices shared by every head, ``K_bar = E K`` and ``V_bar = F V``
(:meth:`attnlab.Mechanism.length_projections`, which Linformer implements), lets the
layer around it mix its inputs instead: the mixing commutes with the feature projection,

.. math:: E (X W^\\top + \\mathbf{1} b^\\top) = (E X) W^\\top + (E \\mathbf{1})\\, b^\\top,

so ``k_proj`` and ``v_proj`` project ``r`` rows instead of ``n`` and the mechanism finishes
with :meth:`~attnlab.Mechanism.attend_projected`. :func:`length_fold` says when that is
valid and cheaper, :func:`attend_folded` runs it; the result is the unfolded one up to
rounding (``tests/test_nn.py`` checks outputs and gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as nnf
from torch import nn

from attnlab.contract import repeat_kv_heads

__all__ = ["attend_folded", "length_fold", "mixed_linear"]


def mixed_linear(x: torch.Tensor, M: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """``M lin(x)`` as ``lin(M x)``: ``(r, n)`` mixing of ``x`` ``(B, n, d)`` along the length
    first; the bias, mixed too, becomes ``(M 1) b^T``."""
    M = M.to(x.dtype)
    out = nnf.linear(torch.matmul(M, x), lin.weight)
    return out if lin.bias is None else out + M.sum(-1, keepdim=True) * lin.bias


def length_fold(mech, n: int, *, rotary: bool, d_in: int, d_kv: int):
    """The mechanism's shared ``(E, F)`` at key length ``n`` when folding is valid and
    cheaper, else ``None``.

    Valid when the mechanism has such a pair (``mech.length_projections(n)``) and keys
    are not rotated by position (``rotary``: RoPE acts per position, after the
    projection). Cheaper when ``r d_in (n + d_kv) < n d_kv (d_in + r)``: mixing costs
    ``r n d_in`` and then projects only ``r`` rows (``d_in``: the larger input feature
    size, ``d_kv = num_kv_heads * head_dim``).
    """
    if rotary:
        return None
    fold = mech.length_projections(n)
    if fold is None:
        return None
    r = fold[0].shape[0]
    return fold if r * d_in * (n + d_kv) < n * d_kv * (d_in + r) else None


def attend_folded(mech, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fold,
                  projections: tuple[nn.Linear, nn.Linear],
                  split: Callable[[torch.Tensor], torch.Tensor], *,
                  key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                  effective: bool = False):
    """Attention of the per-head queries ``q`` ``(B, H, Nq, D)`` to the layer's inputs
    ``key``, ``value`` ``(B, Nk, .)``, mixed along the length by ``fold = (E, F)`` before
    ``projections = (k_proj, v_proj)``; ``split`` turns ``(B, r, Hkv * D)`` into
    ``(B, Hkv, r, D)`` (grouped-query heads are then repeated to ``H``).

    ``key_padding_mask`` (bool ``(B, Nk)``, ``True`` = pad) zeroes the padded columns of
    ``E`` and ``F``: padding mixes in nothing. Returns ``out`` ``(B, H, Nq, D)``, or, with
    ``effective``, ``(out, A)``: the effective weights ``A = P_bar F`` ``(B, H, Nq, Nk)``,
    with ``out = A V``, found by attending to the mixing ``F`` itself (without dropout).
    """
    E, F = fold
    if key_padding_mask is not None:  # bool here: padded columns mix in nothing
        keep = (~key_padding_mask).to(E.dtype)[:, None, :]          # (B, 1, Nk)
        E, F = E * keep, F * keep
    k_proj, v_proj = projections
    B, H = q.shape[:2]
    k = repeat_kv_heads(split(mixed_linear(key, E, k_proj)), H)
    v = repeat_kv_heads(split(mixed_linear(value, F, v_proj)), H)
    out = mech.attend_projected(q, k, v, dropout_p=dropout_p)
    if not effective:
        return out
    mixing = F.expand(B, *F.shape[-2:])[:, None].expand(B, H, *F.shape[-2:])
    return out, mech.attend_projected(q, k, mixing)
