"""An LSTM classifier: the recurrent baseline the attention classifiers are compared with."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from attnlab.contract import check_ids, check_padding_mask
from attnlab.models.blocks import ModelBase
from attnlab.util.checks import check_float, check_int

__all__ = ["LSTMClassifier"]

_WHO = "LSTMClassifier"


class LSTMClassifier(ModelBase):
    """Embedding, a (bi)LSTM (Hochreiter & Schmidhuber 1997) over the real tokens only,
    max and mean pooling over them (concatenated, as in Conneau et al. 2017's BiLSTM-max and
    the mean-pooled baselines), dropout and a linear head.

    ``forward(ids (B, N), padding_mask (B, N) True = pad | None)`` -> logits
    ``(B, num_classes)``, the signature of
    :class:`~attnlab.models.classifier.EncoderClassifier`. Sequences are packed
    (``pack_padded_sequence``), so padding never enters the recurrence and a sequence gives
    the same logits alone as in a padded batch. Padding must be at the end of each row.
    """

    def __init__(self, vocab_size: int, num_classes: int, *, d_model: int = 128,
                 hidden: int = 128, num_layers: int = 1, bidirectional: bool = True,
                 dropout: float = 0.1, pad_id: int = 0) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, who=_WHO)
        check_int("num_classes", num_classes, low=2, who=_WHO)
        check_int("d_model", d_model, who=_WHO)
        check_int("hidden", hidden, who=_WHO)
        check_int("num_layers", num_layers, who=_WHO)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"{_WHO}: bidirectional must be a bool; got {bidirectional!r}")
        dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False, who=_WHO)
        check_int("pad_id", pad_id, low=0, who=_WHO)
        if pad_id >= vocab_size:
            raise ValueError(f"{_WHO}: pad_id must be < vocab_size={vocab_size}; got {pad_id}")
        self.config = {"vocab_size": vocab_size, "num_classes": num_classes,
                       "d_model": d_model, "hidden": hidden, "num_layers": num_layers,
                       "bidirectional": bidirectional, "dropout": dropout, "pad_id": pad_id}
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        # Dropout between stacked layers only (torch warns when num_layers == 1).
        self.lstm = nn.LSTM(d_model, hidden, num_layers, batch_first=True,
                            bidirectional=bidirectional,
                            dropout=dropout if num_layers > 1 else 0.0)
        width = hidden * (2 if bidirectional else 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * width, num_classes)  # [max; mean]

    def forward(self, ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
        check_ids(_WHO, "ids", ids, self.vocab_size, None)  # an LSTM has no length limit
        padding_mask = check_padding_mask(_WHO, "padding_mask", padding_mask, ids)
        B, N = ids.shape
        if padding_mask is None:
            lengths = torch.full((B,), N, dtype=torch.long)
        else:
            lengths = (~padding_mask).sum(1).cpu()
            if bool((lengths == 0).any()):
                raise ValueError(f"{_WHO}: every row needs at least one real token; rows "
                                 f"{(lengths == 0).nonzero().flatten().tolist()} are all padding")
            prefix = torch.arange(N, device=padding_mask.device)[None] >= lengths.to(
                padding_mask.device)[:, None]
            if not torch.equal(prefix, padding_mask):
                raise ValueError(f"{_WHO}: padding_mask must mark padding at the end of each "
                                 f"row only (pack_padded_sequence needs right padding)")
        x = self.dropout(self.embed(ids))
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=N)
        real = (torch.arange(N, device=ids.device)[None] < lengths.to(ids.device)[:, None])
        real = real[..., None]
        mx = h.masked_fill(~real, float("-inf")).amax(1)
        mean = (h * real).sum(1) / lengths.to(h.device, h.dtype)[:, None]
        return self.head(self.dropout(torch.cat([mx, mean], dim=-1)))
