r"""A BERT-style masked language model (Devlin et al. 2019) with any attention mechanism.

The encoder is :class:`~attnlab.models.classifier.EncoderClassifier`'s: the same ``embed``
(:class:`TokenEmbedding`) and ``encoder`` (:class:`TransformerStack`) submodules under the
same names and shapes, so :func:`attnlab.train.regimes.init_weights` loads a pre-trained
encoder into a classifier (``init_from``) and leaves only the classifier's head at its
initialisation. BERT's MLM head (``BertLMPredictionHead``) maps each state :math:`h_i` to

.. math:: z_i = E \, \mathrm{LN}\big(\mathrm{GELU}(W h_i + b)\big) + \beta,

with :math:`E` the input embedding table (tied: the decoder has no weights of its own,
only the output bias :math:`\beta`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import check_ids, check_padding_mask, format_shape
from attnlab.models.args import transformer_args
from attnlab.models.blocks import ModelBase, token_embedding, transformer_stack

__all__ = ["MaskedLM", "MLMHead"]

_WHO = "MaskedLM"


class MLMHead(nn.Module):
    """BERT's transform (dense, GELU, LayerNorm) and the tied decoder's bias; the decoder
    weight, the embedding table, is passed to :meth:`forward`."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), embedding, self.bias)


class MaskedLM(ModelBase):
    """Embeddings, a bidirectional pre-norm transformer encoder and the MLM head.

    ``forward(ids (B, N), padding_mask (B, N) True = pad | None)`` returns logits
    ``(B, N, vocab_size)`` at every position; :meth:`masked_logits` only at the chosen
    ones, which is what training needs (the vocabulary projection is the costliest
    matmul, and 85 % of positions carry no label). The mechanism needs no causal form;
    padded batches need one that can mask keys (``arbitrary_mask`` or ``key_padding``).
    """

    def __init__(self, vocab_size: int, *, mechanism: str = "sdpa",
                 mechanism_kwargs: dict | None = None, d_model: int = 128, num_heads: int = 4,
                 num_layers: int = 2, d_ff: int | None = None, dropout: float = 0.1,
                 max_len: int = 512, positions: str = "sinusoidal", pad_id: int = 0,
                 layer_mechanisms: list[str] | str | None = None) -> None:
        super().__init__()
        args = transformer_args(
            _WHO, mechanism=mechanism, mechanism_kwargs=mechanism_kwargs, d_model=d_model,
            num_heads=num_heads, num_layers=num_layers, d_ff=d_ff, dropout=dropout,
            max_len=max_len, positions=positions, pad_id=pad_id, causal=False,
            vocab={"vocab_size": vocab_size}, layer_mechanisms=layer_mechanisms)
        self.config = {"vocab_size": vocab_size, **args}
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = token_embedding(args, vocab_size)
        self.encoder = transformer_stack(args)
        self.mlm_head = MLMHead(d_model, vocab_size)

    def encode(self, ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """The encoder's states ``(B, N, d_model)`` (after its final LayerNorm)."""
        check_ids(_WHO, "ids", ids, self.vocab_size, self.max_len)
        padding_mask = check_padding_mask(_WHO, "padding_mask", padding_mask, ids)
        return self.encoder(self.embed(ids), key_padding_mask=padding_mask)

    def forward(self, ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
        return self.mlm_head(self.encode(ids, padding_mask), self.embed.weight)

    def masked_logits(self, ids: torch.Tensor, where: torch.Tensor,
                      padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(M, vocab_size)`` at the ``M`` positions where the bool ``where``
        ``(B, N)`` is True, in row-major order: ``forward(ids)[where]``, computed only
        there."""
        if not isinstance(where, torch.Tensor) or where.dtype != torch.bool \
                or where.shape != ids.shape:
            what = (f"{where.dtype} {format_shape(where)}" if isinstance(where, torch.Tensor)
                    else type(where).__name__)
            raise ValueError(f"{_WHO}: where must be a bool tensor of the ids' shape "
                             f"{format_shape(ids)}; got {what}")
        return self.mlm_head(self.encode(ids, padding_mask)[where], self.embed.weight)
