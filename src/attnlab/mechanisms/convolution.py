"""Lightweight and dynamic convolutions (Wu et al. 2019): token mixing with a short kernel.

Wu et al. replace self-attention by a depthwise convolution over the sequence whose ``k``
taps are softmax-normalised and shared by the ``d/H`` channels of each head (eq. 1-3):

.. math::

    \\mathrm{DepthwiseConv}(X, W, i, c) = \\sum_{j=1}^{k} W_{c,j}\\,
        X_{i + j - \\lceil (k+1)/2 \\rceil,\\, c}, \\qquad
    \\mathrm{softmax}(W)_{h,j} = \\frac{\\exp W_{h,j}}{\\sum_{j'=1}^{k} \\exp W_{h,j'}}

    \\mathrm{LightConv}(X, W_{\\lceil cH/d \\rceil,:}, i, c) =
        \\mathrm{DepthwiseConv}(X, \\mathrm{softmax}(W_{\\lceil cH/d \\rceil,:}), i, c)

* ``lightweight_conv`` -- one kernel ``W in R^{H x k}`` per head, the same at every
  position;
* ``dynamic_conv`` -- the kernel is predicted from the current token (eq. 4),
  ``DynamicConv(X, i, c) = LightConv(X, f(X_i)_{h,:}, i, c)`` with the linear map
  ``f(X_i) = sum_c W^Q_{h,j,c} X_{i,c}``, ``W^Q in R^{H x k x d}``.

Mapping onto the (q, k, v) contract. Each contract head is one weight-sharing group
(``H`` of the paper), its ``Dv`` channels the ``d/H`` channels that share a kernel. The
convolution mixes ``v`` along the sequence; ``dynamic_conv``'s ``X_i`` is the current
token's query ``q_i`` (``(B, H, N, D)``, already projected per head by the layer), so
``W^Q`` is ``(H, k, D)``. ``k`` is used by neither, nor ``q`` by ``lightweight_conv``:
their gradients are exact zeros (not ``None``). ``scale`` (default 1, the paper's) multiplies
the kernel logits before their softmax, as it multiplies the scores elsewhere.

Windows. Tap ``j = 1..k`` reads token ``i + j - ceil((k+1)/2)``: offsets ``-(k//2) ..
(k-1)//2``, centred for odd ``k`` (one more tap on the left for even ``k``, as the
formula says). Causal (the paper's decoder): offsets ``-(k-1) .. 0``, the current token
and the ``k - 1`` before it. Taps that fall outside the sequence read zeros (zero
padding, as the paper's convolutions), so the weights of a row near an edge sum to less
than 1: nothing is renormalised.

Key padding (bool ``(B, H, 1, Nk)``, ``True`` = real): a padded key contributes 0 and the
kernel is *not* renormalised over the real taps, as in the paper's code (padded positions
are zeroed before the convolution). Other masks are refused: the weights are not a
softmax over keys, so an additive mask would have no meaning. ``dropout_p`` is DropConnect
on the normalised kernel, as the paper's weight dropout: one draw per head for
``lightweight_conv`` (its kernel is shared by every position), one per token and head for
``dynamic_conv``. ``need_weights`` returns the banded ``(N, N)`` matrix ``A`` with
``out = A v`` (formed only then); the forward itself is ``k`` shifted multiply-adds,
``O(N k Dv)`` time and ``O(N (k + Dv))`` memory, no ``N x N`` tensor.

Decoding (registry flag ``decode_state``): a causal row reads the values of the token and
the ``k - 1`` before it, so the state is those ``k - 1`` values (no keys: neither reads
them), :mod:`attnlab.mechanisms._engines.window_decode`; a token costs ``O(k Dv)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import work_dtype
from attnlab.mechanisms._engines.window_decode import decode_conv
from attnlab.mechanisms.base import Mechanism, key_padding_keep
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism
from attnlab.verify import param_f64

__all__ = ["DynamicConv", "LightweightConv", "band_matrix", "dynamic_conv_reference",
           "lightweight_conv_reference", "tap_offsets"]

WU_2019 = Paper(
    "Pay Less Attention with Lightweight and Dynamic Convolutions",
    "Felix Wu, Angela Fan, Alexei Baevski, Yann N. Dauphin, Michael Auli",
    2019,
    "https://arxiv.org/abs/1901.10430",
)
# exact: each computes its own formula exactly (it approximates nothing); learnable.
_FLAGS = dict(family="convolution", exact=True, causal=True, arbitrary_mask=False,
              key_padding=True, cross=False, returns_weights=True, half_precision=True,
              learnable=True, decode_state=True)
_KERNEL = HParam("kernel_size", int, 7, "taps k of the kernel (the paper's layers use 3 "
                 "to 31); even k: one more tap on the left", low=1)
_NUM_HEADS = HParam("num_heads", int, REQUIRED, "heads H (one kernel per head)", low=1)


def tap_offsets(k: int, causal: bool) -> list[int]:
    """Where tap ``t = 0..k-1`` reads, relative to the query: ``j - ceil((k+1)/2)`` for
    ``j = t + 1`` (``t - k//2``), or ``t - (k-1)`` causal (the last tap is the token)."""
    first = -(k - 1) if causal else -(k // 2)
    return [first + t for t in range(k)]


def band_matrix(taps: torch.Tensor, offsets: list[int], n: int) -> torch.Tensor:
    """``(..., n, n)`` with ``A[i, i + offsets[t]] = taps[..., i, t]`` where the key is in
    ``[0, n)``; ``taps`` is ``(..., n | 1, k)``. Dense, for ``need_weights`` and references."""
    i = torch.arange(n, device=taps.device)
    lag = i[None, :] - i[:, None]                                   # j - i
    out = taps.new_zeros(*taps.shape[:-2], n, n)
    for t, off in enumerate(offsets):
        out = out + taps[..., t:t + 1] * (lag == off).to(taps.dtype)
    return out


# ---------------------------------------------------------------- float64 references
def lightweight_conv_reference(q, k, v, *, mech, scale, is_causal):
    """``out = A v`` with the banded ``A[i, i + o_t] = softmax(scale W_h)_t`` built densely."""
    W = param_f64(mech.weight)                                      # (H, k)
    w = torch.softmax(W * (1.0 if scale is None else scale), dim=-1)
    A = band_matrix(w[:, None, :], tap_offsets(W.shape[-1], is_causal), v.shape[-2])
    return A @ v.double()


def dynamic_conv_reference(q, k, v, *, mech, scale, is_causal):
    """``out = A v`` with ``A[i, i + o_t] = softmax_t(scale sum_c W^Q_{h,t,c} q_{i,c})``."""
    WQ = param_f64(mech.weight)                                     # (H, k, D)
    logits = torch.einsum("bhnc,htc->bhnt", q.double(), WQ)
    w = torch.softmax(logits * (1.0 if scale is None else scale), dim=-1)
    A = band_matrix(w, tap_offsets(WQ.shape[1], is_causal), v.shape[-2])
    return A @ v.double()


# ---------------------------------------------------------------- the shared convolution
def _with_unused(out: torch.Tensor, *unused: torch.Tensor) -> torch.Tensor:
    """``out`` plus an exact 0 that depends on ``unused``: their gradients are zeros, not
    ``None`` (the sum of an empty slice: no NaN even if they hold inf)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in unused):
        return out
    return out + sum(t.flatten()[:0].sum() for t in unused)


def _depthwise(x: torch.Tensor, w: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """``sum_t w[..., t] x[i + offsets[t]]`` over ``x`` ``(B, H, N, Dv)`` zero-padded at
    both ends; ``w`` ``(H, 1, k)`` or ``(B, H, N, k)``. One shifted multiply-add per tap:
    no ``(N, k, Dv)`` unfolding is ever formed."""
    n = x.shape[-2]
    left, right = max(0, -offsets[0]), max(0, offsets[-1])
    xp = F.pad(x, (0, 0, left, right))
    out = None
    for t, off in enumerate(offsets):
        term = w[..., t:t + 1] * xp[..., left + off:left + off + n, :]
        out = term if out is None else out + term
    return out


class _Conv(Mechanism):
    """What both convolutions share: checks, padding, dropout, weights."""

    def default_scale(self, d: int) -> float:
        return 1.0

    def _check_heads(self, q) -> None:
        H = q.shape[1]
        if H != self.hp["num_heads"]:
            raise ValueError(f"{self.spec.name}: num_heads={self.hp['num_heads']} (a kernel "
                             f"per head) does not match the H={H} heads of q; build it with "
                             f"num_heads={H}")

    def _convolve(self, v, w, attn_mask, is_causal, dropout_p, need_weights):
        """``(out, weights)`` for the normalised kernel ``w`` (``(H, 1, k)`` or
        ``(B, H, N, k)``, in the work dtype) applied to ``v``."""
        B, H, n, _ = v.shape
        offsets = tap_offsets(w.shape[-1], is_causal)
        x = v.to(w.dtype)
        keep = key_padding_keep(attn_mask, B, H, n)
        if keep is not None:  # padded keys read as zeros (their content never enters)
            x = x.masked_fill(~keep[..., None], 0.0)
        w_used = F.dropout(w, dropout_p) if dropout_p > 0 else w
        out = _depthwise(x, w_used, offsets).to(v.dtype)
        if not need_weights:
            return out, None
        A = band_matrix(w, offsets, n).expand(B, H, n, n)
        if keep is not None:
            A = A * keep[:, :, None, :].to(A.dtype)
        return out, A.to(v.dtype)

    def _decode(self, q, k, v, state, scale):
        """Causal taps over the token and the ``k - 1`` before it: those values are the
        state (:func:`~attnlab.mechanisms._engines.window_decode.decode_conv`)."""
        self._check_heads(q)
        return decode_conv(self, self._kernel(q, v, scale), v, state)


@register_mechanism(
    "lightweight_conv",
    paper=WU_2019,
    time="O(N k Dv)",
    memory="O(N (k + Dv))",
    equation="out_i = sum_{t=1..k} softmax(scale * W_h)_t v_{i + t - ceil((k+1)/2)}  "
             "(causal: v_{i + t - k}); W in R^(H x k), shared by the Dv channels of a head; "
             "q, k unused; scale = 1",
    aliases=("lightconv",),
    hparams=[_KERNEL, _NUM_HEADS],
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, the banded softmax(W) "
                "matrix applied to v", reference=lightweight_conv_reference),
    **_FLAGS,
)
class LightweightConv(_Conv):
    """LightConv: each head's ``Dv`` channels of v convolved with one softmax-normalised kernel.

    ``weight`` is ``W`` ``(H, k)``, initialised as the paper's code initialises it (Xavier
    uniform on its ``(H, 1, k)`` convolution weight: bound ``sqrt(6 / (k + H k))``).
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        H, k = self.hp["num_heads"], self.hp["kernel_size"]
        bound = math.sqrt(6.0 / (k + H * k))
        self.weight = nn.Parameter(torch.empty(H, k).uniform_(-bound, bound))

    def _kernel(self, q, v, scale):
        W = self.weight.to(work_dtype(v.dtype))
        return torch.softmax(W * scale, dim=-1)[:, None, :]        # (H, 1, k)

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        self._check_heads(q)
        w = self._kernel(q, v, scale)
        out, A = self._convolve(v, w, attn_mask, is_causal, dropout_p, need_weights)
        return _with_unused(out, q, k), A


@register_mechanism(
    "dynamic_conv",
    paper=WU_2019,
    time="O(N k (D + Dv))",
    memory="O(N (k + Dv))",
    equation="out_i = sum_{t=1..k} softmax_t(scale * W^Q_h q_i)_t v_{i + t - ceil((k+1)/2)}  "
             "(causal: v_{i + t - k}); W^Q in R^(H x k x D); k unused; scale = 1",
    aliases=("dynamicconv",),
    hparams=[_KERNEL, _NUM_HEADS,
             HParam("head_dim", int, REQUIRED, "size D of each query head (W^Q maps it to "
                    "k logits)", low=1)],
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, the banded "
                "softmax(W^Q q_i) matrix applied to v", reference=dynamic_conv_reference),
    **_FLAGS,
)
class DynamicConv(_Conv):
    """DynamicConv: a LightConv whose kernel each token predicts from its own query.

    ``weight`` is ``W^Q`` ``(H, k, D)``, each head's ``D -> k`` map Xavier uniform (bound
    ``sqrt(6 / (D + k))``; the paper's code draws its one ``d -> H k`` map Xavier uniform).
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        H, k, d = self.hp["num_heads"], self.hp["kernel_size"], self.hp["head_dim"]
        bound = math.sqrt(6.0 / (d + k))
        self.weight = nn.Parameter(torch.empty(H, k, d).uniform_(-bound, bound))

    def _kernel(self, q, v, scale):
        if q.shape[-1] != self.hp["head_dim"]:
            raise ValueError(f"dynamic_conv: q head dim {q.shape[-1]} does not match "
                             f"head_dim={self.hp['head_dim']} the module was built with; "
                             f"create it with head_dim={q.shape[-1]}")
        work = work_dtype(q.dtype)
        logits = torch.einsum("bhnc,htc->bhnt", q.to(work), self.weight.to(work))
        return torch.softmax(logits * scale, dim=-1)               # (B, H, N, k)

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        self._check_heads(q)
        w = self._kernel(q, v, scale)
        out, A = self._convolve(v, w, attn_mask, is_causal, dropout_p, need_weights)
        return _with_unused(out, k), A
