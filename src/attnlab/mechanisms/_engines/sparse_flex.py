"""The FlexAttention backend of the sparse family, and the mechanism base that picks it.

The patterns and the blocked engine live in
:mod:`attnlab.mechanisms._engines.blocksparse`; this file adds the second, compiled path
(``torch.nn.attention.flex_attention`` with a ``BlockMask`` built from the same block
layout) and :class:`SparseMechanism`, whose ``backend`` hyperparameter chooses between the
two for each call.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import flex_attention

from attnlab.contract import HALF_DTYPES
from attnlab.mechanisms._engines.blocksparse import (
    SparsePattern,
    allows,
    blocked_attention,
    plan_for,
)
from attnlab.mechanisms.base import Mechanism

__all__ = ["BACKENDS", "SparseMechanism", "choose_backend", "flex_attention_sparse"]

_FLEX = None


def _compiled_flex():
    """``torch.compile(flex_attention)``, built once per process (compiling costs seconds)."""
    global _FLEX
    if _FLEX is None:
        # dynamic=False: a new length gets its own static kernel. With the default, the
        # second length triggers a dynamic-shape recompile, whose CPU C++ code fails to
        # build in torch 2.13 (``cur_kvSplitSize4`` undeclared).
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _pattern_mod(rule):
    def mask_mod(b, h, q_idx, kv_idx):
        return allows(rule, q_idx, kv_idx)

    return mask_mod


def _pattern_and_mask_mod(rule, user):
    def mask_mod(b, h, q_idx, kv_idx):
        return allows(rule, q_idx, kv_idx) & user[b, h, q_idx, kv_idx]

    return mask_mod


def _bias_mod(bias):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx]

    return score_mod


def flex_attention_sparse(q, k, v, p: SparsePattern, attn_mask, scale):
    """The same attention through FlexAttention with a ``BlockMask`` from the layout."""
    B, H, N, _ = q.shape
    plan = plan_for(p, q.device)
    score_mod = None
    if attn_mask is None:
        bm = plan.block_mask(True, _pattern_mod(plan.rule))
    else:
        full = attn_mask.expand(B, H, N, N)  # a stride-0 view, nothing is copied
        if attn_mask.dtype == torch.bool:
            bm = plan.block_mask(False, _pattern_and_mask_mod(plan.rule, full))
        else:  # an additive mask goes to score_mod, which runs in full blocks too
            bm = plan.block_mask(True, _pattern_mod(plan.rule))
            score_mod = _bias_mod(full)
    return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale)


# ---------------------------------------------------------------- mechanisms and backends
BACKENDS = ("auto", "blocked", "flex")


def _flex_refusal(name, q, k, v, attn_mask, dropout_p, block_size):
    """Why FlexAttention cannot run this call (``None`` if it can): (exception, message)."""
    if q.dtype not in (torch.float32, *HALF_DTYPES):
        return TypeError, (f"{name}: backend='flex' supports float32/float16/bfloat16; got "
                           f"{q.dtype} (use backend='blocked')")
    if dropout_p > 0:
        return ValueError, (f"{name}: backend='flex' has no attention dropout; got "
                            f"dropout_p={dropout_p} (use backend='blocked' or 'auto')")
    # CUDA's kernels need it; on CPU the compiled kernel of torch 2.13 returned wrong rows
    # (errors up to 3.4, and NaN) with block_size 8 at N = 48..64, correct ones at 16 and up.
    if block_size % 16:
        return ValueError, (f"{name}: backend='flex' needs block_size to be a multiple of 16; "
                            f"got block_size={block_size} (use backend='blocked')")
    grads = [t for t in (q, k, v, attn_mask) if t is not None and t.requires_grad]
    if not q.is_cuda and torch.is_grad_enabled() and grads:
        return NotImplementedError, (
            f"{name}: backend='flex' has no backward on CPU (FlexAttention in torch "
            f"{torch.__version__.split('+')[0]}); run under torch.no_grad() or with inputs "
            f"that do not require grad, or use backend='blocked' (backend='auto' does)")
    return None


def choose_backend(name, requested, q, k, v, attn_mask, dropout_p, block_size) -> str:
    """``blocked`` or ``flex`` for this call.

    ``auto`` takes FlexAttention only on CUDA (where it has a backward) and when it can run
    the call; on CPU it keeps ``blocked``, which needs no compilation (FlexAttention costs
    seconds to compile per pattern shape and has no CPU backward). An explicit ``flex``
    that cannot run raises the reason instead of silently changing backend.
    """
    if requested == "blocked":
        return "blocked"
    refusal = _flex_refusal(name, q, k, v, attn_mask, dropout_p, block_size)
    if requested == "auto":
        return "flex" if q.is_cuda and refusal is None else "blocked"
    if refusal is not None:
        exc, msg = refusal
        raise exc(msg)
    return "flex"


class SparseMechanism(Mechanism):
    """A mechanism given by :meth:`pattern`; the engine does the rest.

    Subclasses declare the hyperparameters ``block_size`` and ``backend``.
    """

    def pattern(self, n: int, causal: bool) -> SparsePattern:
        raise NotImplementedError

    def backend_for(self, q, k, v, attn_mask=None, dropout_p=0.0) -> str:
        return choose_backend(self.spec.name, self.hp["backend"], q, k, v, attn_mask,
                              dropout_p, self.hp["block_size"])

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        p = self.pattern(q.shape[-2], is_causal)
        if self.backend_for(q, k, v, attn_mask, dropout_p) == "flex":
            return flex_attention_sparse(q, k, v, p, attn_mask, scale), None
        return blocked_attention(q, k, v, p, attn_mask, scale, dropout_p), None

    def _check_globals(self, tokens, n: int) -> tuple[int, ...]:
        """Global token indices normalised to ``0 <= g < n`` (negative count from the end)."""
        for t in tokens:
            if not -n <= t < n:
                raise ValueError(
                    f"{self.spec.name}: global_tokens index {t} is out of range for N={n} "
                    f"(expected -{n} <= index < {n})")
        return tuple(sorted({t % n for t in tokens}))
