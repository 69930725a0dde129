r"""Options of :class:`~attnlab.nn.MultiheadAttention` around the mechanism.

* :func:`hybrid_sugar`: ``mechanism="hybrid:local*4+sdpa*4"`` is mechanism ``"hybrid"``
  with ``heads="local*4+sdpa*4"`` (:mod:`attnlab.mechanisms.hybrid`).
* :class:`OutputGate` (Qiu et al. 2025, "Gated Attention for Large Language Models:
  Non-linearity, Sparsity, and Attention-Sink-Free", arXiv 2505.06708): a head-specific,
  elementwise sigmoid gate on each head's output, after the attention and before the
  output projection, computed from the layer's (query) input ``X``:

  .. math:: Y'_h = Y_h \odot \sigma(X W_{\theta, h} + b_{\theta, h})

* :class:`ConvInputs` (Wu et al. 2021, "CvT: Introducing Convolutions to Vision
  Transformers", arXiv 2103.15808, §3.2 "Convolutional Projection"): a depthwise
  convolution of the inputs before the ``Q``, ``K``, ``V`` projections, one per stream,

  .. math:: x^{q/k/v} = \mathrm{DWConv}^{q/k/v}(x), \qquad Q = x^q W^Q, \dots

  CvT convolves the 2-D grid of image tokens; a layer here sees a 1-D sequence, so the
  convolution runs along it (a ViT's patches in raster order then mix with their row
  neighbours only). Not kept from the paper: the BatchNorm after the convolution (batch
  statistics would mix padding in and differ between a prefill and one-token decoding)
  and the stride-2 squeeze of keys and values. A causal call pads on the left only (no
  look-ahead: position ``i`` sees inputs ``i-k+1 .. i``), any other call centres the
  kernel; positions that ``key_padding_mask`` marks are zeroed first, so padding never
  leaks into real tokens. Decoding with a KV cache keeps the last ``k - 1`` inputs on the
  cache (``conv_tail``), so one token at a time equals the causal forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import nn

from attnlab.registry import resolve_name

__all__ = ["ConvInputs", "OutputGate", "hybrid_sugar"]


def hybrid_sugar(mechanism, hparams: dict, who: str) -> tuple[str, dict]:
    """``("hybrid", {..., "heads": text})`` for ``"hybrid:text"``; anything else as is."""
    if not isinstance(mechanism, str) or ":" not in mechanism:
        return mechanism, hparams
    name, _, heads = mechanism.partition(":")
    if resolve_name(name) != "hybrid":
        raise ValueError(f"{who}mechanism {mechanism!r}: only 'hybrid:<heads>' takes a ':' "
                         f"(e.g. 'hybrid:local*4+sdpa*4'); {name.strip()!r} does not")
    if "heads" in hparams:
        raise ValueError(f"{who}mechanism {mechanism!r} gives heads, and so does heads="
                         f"{hparams['heads']!r}; give it once")
    return "hybrid", {**hparams, "heads": heads.strip()}


class OutputGate(nn.Module):
    """``Y_h * sigmoid(X W_h + b_h)``: one gate per head and element, from the query input."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, device=device,
                              dtype=dtype)

    def reset_parameters(self) -> None:
        # As the layer's q/k/v projections (Xavier, zero bias): sigmoid(~0) halves each
        # head's output at the start.
        nn.init.xavier_uniform_(self.proj.weight)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out`` ``(B, H, Nq, D)`` gated by ``x`` ``(B, Nq, E)``."""
        B, N = x.shape[:2]
        g = torch.sigmoid(self.proj(x)).view(B, N, self.num_heads, self.head_dim)
        return out * g.transpose(1, 2).to(out.dtype)


def _zero_padding(x: torch.Tensor, kpm: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``(B, N, C)`` with the rows ``kpm`` marks as padding (bool ``True``, or an
    additive ``-inf``) set to zero, as the rows beyond the sequence are."""
    if kpm is None:
        return x
    pad = kpm if kpm.dtype == torch.bool else torch.isneginf(kpm)
    return x.masked_fill(pad[..., None], 0.0)


class ConvInputs(nn.Module):
    """Depthwise 1-D convolutions of ``kernel_size`` taps of the query, key and value
    inputs (one each, no bias), before their projections."""

    def __init__(self, kernel_size: int, dims: tuple[int, int, int], device=None,
                 dtype=None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.q_conv, self.k_conv, self.v_conv = (
            nn.Conv1d(d, d, kernel_size, groups=d, bias=False, device=device, dtype=dtype)
            for d in dims)

    def reset_parameters(self) -> None:
        for conv in (self.q_conv, self.k_conv, self.v_conv):  # nn.Conv1d's own, as CvT's
            conv.reset_parameters()

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor, causal: bool, past=None):
        """``conv`` along the length of ``x`` ``(B, N, C)``; ``past`` ``(B, k-1, C)``
        replaces the causal zero padding (decoding)."""
        k = self.kernel_size
        xt = x.transpose(1, 2)
        if past is not None:
            xt = torch.cat([past.transpose(1, 2).to(x.dtype), xt], dim=2)
        elif causal:
            xt = nnf.pad(xt, (k - 1, 0))
        else:
            xt = nnf.pad(xt, ((k - 1) // 2, k - 1 - (k - 1) // 2))
        return conv(xt).transpose(1, 2)

    def apply(self, query, key, value, *, causal: bool, key_padding_mask, self_attn: bool,
              cache, T: int, who: str):
        """``(query, key, value, tail)`` convolved for a layer's call: ``tail`` is ``None``
        without a ``cache``, else the one to store once the call succeeded
        (:meth:`decode`)."""
        if cache is not None:  # decoding is causal self-attention: one stream, the query
            streams, tail = self.decode(query, cache, T, who)
            return (*streams, tail)
        return (*self(query, key, value, causal=causal, key_padding_mask=key_padding_mask,
                      self_attn=self_attn), None)

    def forward(self, query, key, value, *, causal: bool, key_padding_mask=None,
                self_attn: bool = False):
        """The convolved ``(query, key, value)`` of a call without a cache."""
        key, value = (_zero_padding(t, key_padding_mask) for t in (key, value))
        if self_attn:  # the query is the same sequence: its padding is known too
            query = _zero_padding(query, key_padding_mask)
        return (self._conv(self.q_conv, query, causal), self._conv(self.k_conv, key, causal),
                self._conv(self.v_conv, value, causal))

    def decode(self, x: torch.Tensor, cache, T: int, who: str):
        """``((q, k, v) inputs, tail)`` for ``x``, the new tokens at ``T ..`` of a causal
        self-attention decode: the last ``k - 1`` inputs before them are ``cache``'s
        ``conv_tail``; ``tail`` is the one ending with ``x``, for the caller to store once
        the call succeeded (a failed call must leave the cache as it was)."""
        k = self.kernel_size
        tail = getattr(cache, "conv_tail", None)
        if T == 0:  # a new sequence: zeros before it, as in the causal forward
            past = x.new_zeros(x.shape[0], k - 1, x.shape[2])
        elif tail is None or tail[0] != T or tail[1].shape[0] != x.shape[0]:
            raise ValueError(f"{who}conv_kernel_size={k} decodes with the last {k - 1} "
                             f"inputs kept on the kv_cache, but this cache holds none for "
                             f"its {T} positions (filled by another layer, or without "
                             f"conv_kernel_size?); reset() it and prefill through this layer")
        else:
            past = tail[1]
        stream = torch.cat([past.to(x.dtype), x], dim=1)
        tail = (T + x.shape[1], stream[:, stream.shape[1] - (k - 1):])
        return tuple(self._conv(c, x, True, past) for c in (self.q_conv, self.k_conv,
                                                               self.v_conv)), tail
