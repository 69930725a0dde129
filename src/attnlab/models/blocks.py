"""Transformer building blocks shared by the text models: positions, embeddings, the
pre-norm block and a stack of them.

Every attention layer is :class:`attnlab.nn.MultiheadAttention` with a registered
mechanism, so any mechanism plugs into any model by name. The block is *pre-norm*
(Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"):

.. math:: x \\leftarrow x + \\mathrm{Drop}(\\mathrm{MHA}(\\mathrm{LN}(x))), \\qquad
    x \\leftarrow x + \\mathrm{Drop}(\\mathrm{FFN}(\\mathrm{LN}(x))), \\qquad
    \\mathrm{FFN}(x) = W_2\\, \\mathrm{GELU}(W_1 x)

with a final LayerNorm after the stack (pre-norm leaves the residual stream unnormalised).
Dropout (Vaswani et al. 2017, §5.4) acts on the embeddings, each sublayer's output and the
FFN's hidden layer, never on attention weights (see :class:`TransformerBlock`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnlab.contract import check_positions
from attnlab.models.args import as_layer_mechanism, attn_positions, padding_for
from attnlab.nn import MultiheadAttention
from attnlab.util.checks import check_int

__all__ = [
    "TokenEmbedding",
    "TransformerBlock",
    "TransformerStack",
    "sinusoidal_table",
]


# ------------------------------------------------------------------------------ positions

def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    r"""``(n, d)`` sinusoidal positions (Vaswani et al. 2017, §3.5), float32:

    .. math:: PE_{(p, 2i)} = \sin(p / 10000^{2i/d}), \qquad
        PE_{(p, 2i+1)} = \cos(p / 10000^{2i/d})

    (odd ``d``: the last sine column has no cosine partner).
    """
    check_int("n", n, who="sinusoidal_table")
    check_int("d", d, who="sinusoidal_table")
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    table = torch.zeros(n, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: d // 2])
    return table.float()


class TokenEmbedding(nn.Module):
    """``E[x] * sqrt(d_model)`` (Vaswani et al. 2017, §3.4) plus sinusoidal or learned
    absolute positions, then dropout. ``rope``/``alibi``/``none`` add nothing here (the
    first two act inside attention).

    The table is initialised ``N(0, 1/d_model)`` so the scaled embedding has unit variance
    and, when the table is tied to the output layer (Press & Wolf 2017), the logits of a
    LayerNorm-ed state start with unit variance too.
    """

    def __init__(self, vocab_size: int, d_model: int, positions: str, max_len: int,
                 dropout: float) -> None:
        super().__init__()
        self.d_model, self.positions, self.max_len = d_model, positions, max_len
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * d_model ** -0.5)
        self.scale = math.sqrt(d_model)
        self.learned = None
        if positions == "sinusoidal":
            self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)
        elif positions == "learned":
            self.learned = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor, offset: int = 0,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """``ids`` ``(B, N)`` at absolute positions ``offset .. offset+N-1``, or at
        ``positions`` ``(N,)`` (integers in ``[0, max_len)``, any order: a shard of a longer
        sequence, as context parallelism gives each rank) -> ``(B, N, d)``."""
        x = nn.functional.embedding(ids, self.weight) * self.scale
        n = ids.shape[1]
        if positions is not None:
            at = self._check_positions(positions, n, offset)
        elif offset + n > self.max_len:
            raise ValueError(f"TokenEmbedding: positions up to {offset + n} exceed "
                             f"max_len={self.max_len}")
        else:
            at = slice(offset, offset + n)
        if self.positions == "sinusoidal":
            x = x + self.table[at].to(x.dtype)
        elif self.learned is not None:
            x = x + self.learned[at]
        return self.dropout(x)

    def _check_positions(self, positions, n: int, offset: int) -> torch.Tensor:
        """``positions`` as an index into the tables, or an error naming it."""
        if offset:
            raise ValueError(f"TokenEmbedding: offset must be 0 when positions are given "
                             f"(they are absolute); got offset={offset}")
        at = check_positions("TokenEmbedding", "positions", positions, n, high=self.max_len)
        return at.to(self.weight.device)


# ------------------------------------------------------------------------------- the block

class TransformerBlock(nn.Module):
    """One pre-norm layer: self-attention, optional cross-attention (decoders), FFN.

    ``attn_positions`` is ``"rope"``, ``"alibi"`` or ``None`` (the model's sinusoidal or
    learned positions live in the embedding). Cross-attention never takes positions: the
    memory's positions were already encoded by the encoder.
    """

    def __init__(self, d_model: int, num_heads: int, mechanism: str = "sdpa",
                 mechanism_kwargs: dict | None = None, *, d_ff: int | None = None,
                 dropout: float = 0.1, max_len: int = 512, attn_positions: str | None = None,
                 cross: bool = False, cross_mechanism: str = "sdpa",
                 cross_mechanism_kwargs: dict | None = None) -> None:
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.norm1 = nn.LayerNorm(d_model)
        # No dropout on the attention weights: the paper drops sublayer outputs and
        # embeddings only (§5.4), and kernel mechanisms never form weights to drop, so every
        # mechanism is regularised the same way.
        self.self_attn = MultiheadAttention(d_model, num_heads, mechanism,
                                            positions=attn_positions, max_seq_len=max_len,
                                            **(mechanism_kwargs or {}))
        self.cross_attn = None
        if cross:
            self.norm_cross = nn.LayerNorm(d_model)
            self.cross_attn = MultiheadAttention(d_model, num_heads, cross_mechanism,
                                                 max_seq_len=max_len,
                                                 **(cross_mechanism_kwargs or {}))
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(d_ff, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
                is_causal: bool = False, memory: torch.Tensor | None = None,
                memory_padding_mask: torch.Tensor | None = None, kv_cache=None,
                need_weights: bool = False, positions: torch.Tensor | None = None):
        """``x`` ``(B, N, d)`` -> ``(B, N, d)``, or ``(out, weights)`` with the
        self-attention weights ``(B, H, N, N)`` when ``need_weights``.

        ``key_padding_mask`` ``(B, N)`` is ``True`` at padding (torch's convention); it is
        handed to the layer through :func:`padding_for`. ``kv_cache`` (an
        ``attnlab.nn.cache.KVCache``) decodes incrementally: ``x`` holds the new tokens only.
        ``positions`` ``(N,)``: the tokens' global positions, for the self-attention's RoPE
        (:class:`~attnlab.nn.MultiheadAttention`), when ``x`` is one shard of a sequence.
        """
        if (memory is None) != (self.cross_attn is None):
            raise ValueError("TransformerBlock: memory must be given exactly when the block "
                             f"has cross-attention (cross={self.cross_attn is not None}); "
                             f"got memory={'None' if memory is None else 'a tensor'}")
        kpm = padding_for(self.self_attn.spec, key_padding_mask, is_causal)
        kw = {} if kv_cache is None else {"kv_cache": kv_cache}
        if positions is not None:
            kw["positions"] = positions
        res = self.self_attn(self.norm1(x), key_padding_mask=kpm, is_causal=is_causal,
                             need_weights=need_weights, **kw)
        h, weights = res if need_weights else (res, None)
        x = x + self.dropout(h)
        if self.cross_attn is not None:
            mpm = padding_for(self.cross_attn.spec, memory_padding_mask, False)
            h = self.cross_attn(self.norm_cross(x), memory, key_padding_mask=mpm)
            x = x + self.dropout(h)
        x = x + self.dropout(self.ff(self.norm2(x)))
        return (x, weights) if need_weights else x

    def attention_relations(self, x: torch.Tensor, *,
                            key_padding_mask: torch.Tensor | None = None,
                            is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (B, H, N, N), V (B, H, N, d_k))``: this block's self-attention
        probabilities on ``x`` and its value heads ``V = LN(x) W^V``, with gradients (in
        the caller's mode), for losses on them (MiniLM's attention and value-relation
        transfer). ``A`` is the mechanism's own weights or, when it never forms them, the
        effective ``A`` with ``out = A V`` (:class:`~attnlab.nn.MultiheadAttention`); a
        mechanism with neither raises there. The FFN is skipped: nothing after the
        attention enters ``A`` or ``V``."""
        attn = self.self_attn
        if attn.conv is not None or attn.num_kv_heads != attn.num_heads:
            # V would not be v_proj(LN(x)) per query head; the models build neither.
            raise ValueError("TransformerBlock.attention_relations: a layer with "
                             "conv_kernel_size or num_kv_heads != num_heads is not supported")
        kpm = padding_for(attn.spec, key_padding_mask, is_causal)
        h = self.norm1(x)
        _, weights = attn(h, key_padding_mask=kpm, is_causal=is_causal, need_weights=True)
        B, N = h.shape[:2]
        values = attn.v_proj(h).view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        return weights, values


class TransformerStack(nn.Module):
    """``num_layers`` :class:`TransformerBlock` s and the final LayerNorm (pre-norm);
    ``layer_mechanisms`` (:func:`check_layer_mechanisms`) replaces ``mechanism`` layer by
    layer, ``mechanism_kwargs`` reaching only the layers that run ``mechanism`` itself."""

    def __init__(self, num_layers: int, d_model: int, num_heads: int, *,
                 layer_mechanisms: list[str] | None = None, **block_kwargs) -> None:
        super().__init__()
        if layer_mechanisms is not None and len(layer_mechanisms) != num_layers:
            raise ValueError(f"TransformerStack: layer_mechanisms must hold one mechanism per "
                             f"layer ({num_layers}); got {len(layer_mechanisms)}")
        main = block_kwargs.get("mechanism", "sdpa")
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, num_heads, **block_kwargs) if m == main else
            TransformerBlock(d_model, num_heads, **{**block_kwargs, "mechanism": m,
                                                    "mechanism_kwargs": None})
            for m in (map(as_layer_mechanism, layer_mechanisms) if layer_mechanisms
                      else [main] * num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, *, kv_caches=None, need_weights: bool = False, **kw):
        """Runs every layer with the same keyword arguments (see
        :meth:`TransformerBlock.forward`); ``kv_caches`` holds one cache per layer.
        Returns ``x``, or ``(x, [weights per layer])`` when ``need_weights``."""
        if kv_caches is not None and len(kv_caches) != len(self.layers):
            raise ValueError(f"TransformerStack: kv_caches must hold one cache per layer "
                             f"({len(self.layers)}); got {len(kv_caches)}")
        maps = []
        for i, layer in enumerate(self.layers):
            cache = None if kv_caches is None else kv_caches[i]
            res = layer(x, kv_cache=cache, need_weights=need_weights, **kw)
            if need_weights:
                x, w = res
                maps.append(w)
            else:
                x = res
        x = self.norm(x)
        return (x, maps) if need_weights else x

    def attention_relations(self, x: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, V)`` of the *last* layer (:meth:`TransformerBlock.attention_relations`),
        the layers before it run as in :meth:`forward` (same keyword arguments)."""
        for layer in self.layers[:-1]:
            x = layer(x, **kw)
        return self.layers[-1].attention_relations(x, **kw)


class ModelBase(nn.Module):
    """What every attnlab model has: ``config`` (its constructor arguments, JSON-ready, so
    ``type(m)(**m.config)`` rebuilds the architecture) and :meth:`num_parameters`."""

    config: dict

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters counted once each (tied weights once)."""
        return sum(p.numel() for p in self.parameters()
                   if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters():,}"


def token_embedding(args: dict, vocab_size: int) -> TokenEmbedding:
    """The token embeddings of a model whose arguments :func:`transformer_args` checked."""
    return TokenEmbedding(vocab_size, args["d_model"], args["positions"], args["max_len"],
                          args["dropout"])


def transformer_stack(args: dict) -> TransformerStack:
    """The transformer stack of a model whose arguments :func:`transformer_args` checked
    (one mechanism per layer where ``layer_mechanisms`` is given)."""
    return TransformerStack(
        args["num_layers"], args["d_model"], args["num_heads"], mechanism=args["mechanism"],
        mechanism_kwargs=args["mechanism_kwargs"], d_ff=args["d_ff"], dropout=args["dropout"],
        max_len=args["max_len"], attn_positions=attn_positions(args["positions"]),
        layer_mechanisms=args.get("layer_mechanisms"))
