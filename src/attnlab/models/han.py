r"""Hierarchical Attention Network for document classification (Yang et al. 2016, NAACL,
"Hierarchical Attention Networks for Document Classification").

A document is ``L`` sentences ``s_i`` of ``T_i`` words ``w_it``. Words are encoded by a
bidirectional GRU over each sentence, pooled by word attention into a sentence vector;
sentence vectors are encoded by a bidirectional GRU over the document, pooled by sentence
attention into a document vector, and a linear layer gives the class logits (eqs. 5-11)::

    x_it = W_e w_it,           h_it = [GRU->(x_it); GRU<-(x_it)]
    u_it = tanh(W_w h_it + b_w),  a_it = exp(u_it^T u_w) / sum_t exp(u_it^T u_w),
    s_i = sum_t a_it h_it
    h_i = [GRU->(s_i); GRU<-(s_i)],  u_i = tanh(W_s h_i + b_s),
    a_i = exp(u_i^T u_s) / sum_i exp(u_i^T u_s),  v = sum_i a_i h_i
    p = softmax(W_c v + b_c)        (the model returns the logits W_c v + b_c)

``u_w`` and ``u_s`` are the learned word and sentence context vectors. The paper's sizes
are ``d_model = 200`` (word embeddings) and ``hidden = 50`` per GRU direction, so ``h`` and
``u`` have ``2 hidden = 100`` dimensions. Dropout (not in the paper, as in
:class:`~attnlab.models.recurrent.LSTMClassifier`) acts on the word embeddings and on ``v``.

Padding: ``ids`` ``(B, S, T)`` with ``padding_mask`` ``(B, S, T)`` (``True`` = pad). A
sentence whose words are all padding is a padded sentence. Words are packed
(``pack_padded_sequence``) and so are sentences, so padding never enters either GRU; the
attention gives padded words and padded sentences exactly zero weight. A document gives
the same logits alone as in a padded batch. Padding must be at the end: of each sentence
for words, of each document for sentences.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from attnlab.contract import check_padding_mask, format_shape, masked_softmax
from attnlab.models.blocks import ModelBase
from attnlab.util.checks import check_float, check_int

__all__ = ["AttentionPool", "HierarchicalAttentionNetwork"]

_WHO = "HierarchicalAttentionNetwork"


class AttentionPool(nn.Module):
    """One attention level of the HAN: ``u = tanh(W h + b)``, ``a = softmax(u^T u_c)`` over
    the real positions (padding gets weight 0), ``sum a h``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        # "randomly initialized and jointly learned" (sec. 2.2); unit-scale scores at start.
        self.context = nn.Parameter(torch.randn(dim) * dim ** -0.5)

    def forward(self, h: torch.Tensor, real: torch.Tensor):
        """``h`` ``(M, N, dim)``, ``real`` ``(M, N)`` bool -> ``(pooled (M, dim), a (M, N))``."""
        a = masked_softmax(torch.tanh(self.proj(h)) @ self.context, real)
        return torch.einsum("mn,mnd->md", a, h), a


def _bigru(d_in: int, hidden: int, num_layers: int, dropout: float) -> nn.GRU:
    return nn.GRU(d_in, hidden, num_layers, batch_first=True, bidirectional=True,
                  dropout=dropout if num_layers > 1 else 0.0)


def _run_packed(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``gru`` over the first ``lengths[m]`` steps of each row of ``x`` ``(M, N, d)``;
    later steps are zeros."""
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(gru(packed)[0], batch_first=True, total_length=x.shape[1])[0]


def _right_padded(real: torch.Tensor) -> bool:
    """Every row along the last dim is real positions followed only by padding."""
    r = real.int()
    return bool((r.flip(-1).cummax(dim=-1).values.flip(-1) == r).all())


class HierarchicalAttentionNetwork(ModelBase):
    """HAN (Yang et al. 2016): word GRU + word attention -> sentence vectors, sentence GRU
    + sentence attention -> document vector -> linear classifier.

    ``forward(ids (B, S, T), padding_mask (B, S, T) True = pad | None)`` -> logits
    ``(B, num_classes)``; :meth:`attention_maps` gives the word weights ``(B, S, T)`` and
    sentence weights ``(B, S)``. ``num_layers`` stacks GRU layers in both encoders (the
    paper: 1).
    """

    def __init__(self, vocab_size: int, num_classes: int, *, d_model: int = 200,
                 hidden: int = 50, num_layers: int = 1, dropout: float = 0.1,
                 pad_id: int = 0) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, who=_WHO)
        check_int("num_classes", num_classes, low=2, who=_WHO)
        check_int("d_model", d_model, who=_WHO)
        check_int("hidden", hidden, who=_WHO)
        check_int("num_layers", num_layers, who=_WHO)
        dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False,
                              who=_WHO)
        check_int("pad_id", pad_id, low=0, who=_WHO)
        if pad_id >= vocab_size:
            raise ValueError(f"{_WHO}: pad_id must be < vocab_size={vocab_size}; got {pad_id}")
        self.config = {"vocab_size": vocab_size, "num_classes": num_classes,
                       "d_model": d_model, "hidden": hidden, "num_layers": num_layers,
                       "dropout": dropout, "pad_id": pad_id}
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)   # W_e
        self.word_encoder = _bigru(d_model, hidden, num_layers, dropout)
        self.word_attention = AttentionPool(2 * hidden)                     # W_w, b_w, u_w
        self.sentence_encoder = _bigru(2 * hidden, hidden, num_layers, dropout)
        self.sentence_attention = AttentionPool(2 * hidden)                 # W_s, b_s, u_s
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, num_classes)                      # W_c, b_c

    def _check(self, ids, padding_mask) -> torch.Tensor:
        """The real words ``(B, S, T)`` bool, after every check on the inputs."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{_WHO}: ids must be a torch.Tensor of token ids; "
                            f"got {type(ids).__name__}")
        if ids.dtype != torch.long:
            raise TypeError(f"{_WHO}: ids must be a LongTensor (int64) of token ids; "
                            f"got dtype {ids.dtype}")
        if ids.dim() != 3 or ids.numel() == 0:
            raise ValueError(f"{_WHO}: ids must be 3-D (B, S, T) documents x sentences x "
                             f"words with B, S, T >= 1; got shape {format_shape(ids)}")
        lo, hi = (int(x) for x in torch.aminmax(ids))
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"{_WHO}: ids must hold ids in [0, {self.vocab_size}) "
                             f"(vocab_size={self.vocab_size}); got values in [{lo}, {hi}]")
        padding_mask = check_padding_mask(_WHO, "padding_mask", padding_mask, ids)
        real = torch.ones_like(ids, dtype=torch.bool) if padding_mask is None else ~padding_mask
        empty = ~real.any(dim=(1, 2))
        if bool(empty.any()):
            raise ValueError(f"{_WHO}: every document needs at least one real word; documents "
                             f"{empty.nonzero().flatten().tolist()} are all padding")
        if not _right_padded(real):
            raise ValueError(f"{_WHO}: padding_mask must mark padding at the end of each "
                             f"sentence only (the word GRU packs right-padded sentences)")
        if not _right_padded(real.any(dim=-1)):
            raise ValueError(f"{_WHO}: padded sentences (all words padding) must come after "
                             f"the real sentences of each document")
        return real

    def _forward(self, ids, padding_mask):
        """``(logits, word weights (B, S, T), sentence weights (B, S))``."""
        real = self._check(ids, padding_mask)
        B, S, T = ids.shape
        words = real.sum(-1)                                   # (B, S) real words
        sentence_real = words > 0
        rows = sentence_real.flatten().nonzero().flatten()     # only real sentences run
        x = self.dropout(self.embed(ids.reshape(B * S, T)[rows]))
        h = _run_packed(self.word_encoder, x, words.flatten()[rows])
        s, a_word = self.word_attention(h, real.reshape(B * S, T)[rows])
        sentences = s.new_zeros(B * S, s.shape[-1]).index_copy(0, rows, s).view(B, S, -1)
        word_w = a_word.new_zeros(B * S, T).index_copy(0, rows, a_word).view(B, S, T)
        h = _run_packed(self.sentence_encoder, sentences, sentence_real.sum(-1))
        v, sentence_w = self.sentence_attention(h, sentence_real)
        return self.head(self.dropout(v)), word_w, sentence_w

    def forward(self, ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
        return self._forward(ids, padding_mask)[0]

    def attention_maps(self, ids: torch.Tensor, padding_mask: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
        """``{"words": a_it (B, S, T), "sentences": a_i (B, S)}``, the word and sentence
        attention weights (each sums to 1 over the real positions, padding gets 0; a padded
        sentence's word weights are 0), in eval mode without gradients."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                _, words, sentences = self._forward(ids, padding_mask)
        finally:
            self.train(was)
        return {"words": words, "sentences": sentences}
