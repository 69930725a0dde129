"""A transformer encoder for sequence classification with any attention mechanism."""

from __future__ import annotations

import torch
from torch import nn

from attnlab.contract import check_ids, check_padding_mask, masked_softmax
from attnlab.models.args import transformer_args
from attnlab.models.blocks import ModelBase, token_embedding, transformer_stack
from attnlab.util.checks import check_choice, check_int

__all__ = ["POOLING", "EncoderClassifier"]

POOLING = ("cls", "mean", "attention")
_WHO = "EncoderClassifier"


class AttentionPooling(nn.Module):
    r"""Self-attentive pooling (Lin et al. 2017, "A Structured Self-attentive Sentence
    Embedding", eq. 5 with one hop, ``r = 1``): a learned scorer weighs the tokens,

    .. math:: a = \mathrm{softmax}\big(w_2^\top \tanh(W_1 H^\top)\big), \qquad m = a H,

    with padded tokens given weight 0.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.W1 = nn.Linear(d_model, d_model, bias=False)
        self.w2 = nn.Linear(d_model, 1, bias=False)

    def forward(self, h: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        scores = self.w2(torch.tanh(self.W1(h))).squeeze(-1)        # (B, N)
        a = masked_softmax(scores, real)                            # pads -> weight 0
        return torch.einsum("bn,bnd->bd", a, h)


class EncoderClassifier(ModelBase):
    """Embeddings, a pre-norm transformer encoder, pooling, dropout and a linear head.

    ``pooling``: ``"cls"`` takes the first token's state (the caller prepends a CLS token),
    ``"mean"`` averages the real tokens' states, ``"attention"`` is
    :class:`AttentionPooling`. ``forward(ids (B, N), padding_mask (B, N) True = pad | None)``
    returns logits ``(B, num_classes)``. A sequence gives the same logits alone as in a
    padded batch for every mechanism that can mask padded keys.
    """

    def __init__(self, vocab_size: int, num_classes: int, *, pooling: str = "cls",
                 mechanism: str = "sdpa", mechanism_kwargs: dict | None = None,
                 d_model: int = 128, num_heads: int = 4, num_layers: int = 2,
                 d_ff: int | None = None, dropout: float = 0.1, max_len: int = 512,
                 positions: str = "sinusoidal", pad_id: int = 0,
                 layer_mechanisms: list[str] | str | None = None) -> None:
        super().__init__()
        args = transformer_args(
            _WHO, mechanism=mechanism, mechanism_kwargs=mechanism_kwargs, d_model=d_model,
            num_heads=num_heads, num_layers=num_layers, d_ff=d_ff, dropout=dropout,
            max_len=max_len, positions=positions, pad_id=pad_id, causal=False,
            vocab={"vocab_size": vocab_size}, layer_mechanisms=layer_mechanisms)
        check_int("num_classes", num_classes, low=2, who=_WHO)
        check_choice("pooling", pooling, POOLING, who=_WHO)
        self.config = {"vocab_size": vocab_size, "num_classes": num_classes,
                       "pooling": pooling, **args}
        self.vocab_size, self.max_len, self.pooling = vocab_size, max_len, pooling
        self.embed = token_embedding(args, vocab_size)
        self.encoder = transformer_stack(args)
        self.pool = AttentionPooling(d_model) if pooling == "attention" else None
        self.dropout = nn.Dropout(args["dropout"])
        self.head = nn.Linear(d_model, num_classes)

    def _encode(self, ids, padding_mask, need_weights=False):
        check_ids(_WHO, "ids", ids, self.vocab_size, self.max_len)
        padding_mask = check_padding_mask(_WHO, "padding_mask", padding_mask, ids)
        return self.encoder(self.embed(ids), key_padding_mask=padding_mask,
                            need_weights=need_weights), padding_mask

    def forward(self, ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
        h, padding_mask = self._encode(ids, padding_mask)
        real = (torch.ones_like(ids, dtype=torch.bool) if padding_mask is None
                else ~padding_mask)
        if self.pooling == "cls":
            pooled = h[:, 0]
        elif self.pooling == "mean":
            w = real.to(h.dtype)
            # A row of padding only (no real token) pools to zeros, not NaN.
            pooled = (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        else:
            pooled = self.pool(h, real)
        return self.head(self.dropout(pooled))

    def attention_maps(self, ids: torch.Tensor,
                       padding_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Self-attention weights ``(B, H, N, N)`` of every layer, in eval mode (no
        dropout), without gradients; the effective weights ``A`` (``out = A v``) for a
        mechanism that never forms them (see :class:`~attnlab.nn.MultiheadAttention`)."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                (_, maps), _ = self._encode(ids, padding_mask, need_weights=True)
        finally:
            self.train(was)
        return maps

    @property
    def last_attention(self):
        """The last layer's self-attention (:class:`~attnlab.nn.MultiheadAttention`)."""
        return self.encoder.layers[-1].self_attn

    def attention_relations(self, ids: torch.Tensor, padding_mask: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (B, H, N, N), V (B, H, N, d_k))`` of the last layer: its self-attention
        probabilities and value heads, *with* gradients and in the current mode (unlike
        :meth:`attention_maps`), for distillation losses (``attnlab.train.distill``)."""
        check_ids(_WHO, "ids", ids, self.vocab_size, self.max_len)
        padding_mask = check_padding_mask(_WHO, "padding_mask", padding_mask, ids)
        return self.encoder.attention_relations(self.embed(ids), key_padding_mask=padding_mask)
