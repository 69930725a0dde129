r"""A classifier of sequence pairs (question, passage) with a pluggable pairing.

Shared token embeddings, one small encoder per side (a pre-norm transformer with any
registered mechanism, or a BiLSTM), then the *pairing*, which turns the two encoded
sequences ``A`` ``(B, Na, d)`` and ``B`` ``(B, Nb, d)`` into two summaries ``a^, b^``:

* a co-attention mechanism of the registry (``inputs="pair"``: ``co_attention_parallel``,
  ``co_attention_alternating``; Lu et al. 2016), ``(a^, b^) = coatt(A, B)``;
* ``"cross"``: plain cross-attention, the question attending the passage through
  :class:`attnlab.nn.MultiheadAttention` (``mechanism``, any registered one with
  ``cross``): ``X = MHA(A, B, B)``, ``a^ = mean_t A_t``, ``b^ = mean_t X_t`` over the
  question's real positions. Only the question side looks across; the passage is read
  only through what each question token finds.

Then an MLP over ``[a^; b^]``: ``W_2 GELU(W_1 Drop([a^; b^]))``. ``forward(a_ids (B, Na),
b_ids (B, Nb), a_padding (B, Na) | None, b_padding (B, Nb) | None)`` -> logits ``(B,
num_classes)``; the padding masks are ``True`` at padding (the models' convention, as
:class:`~attnlab.models.classifier.EncoderClassifier`), handed to the co-attention as
``~padding`` (its ``True`` = real). A pair gives the same logits alone as in a padded
batch (for an encoder mechanism that masks padded keys).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import attnlab.mechanisms.co_attention  # noqa: F401  (registers the co-attention pairings)
from attnlab.contract import check_ids, check_padding_mask
from attnlab.models.args import check_mechanism, padding_for, transformer_args
from attnlab.models.blocks import ModelBase, token_embedding, transformer_stack
from attnlab.nn import MultiheadAttention
from attnlab.registry import create, list_mechanisms
from attnlab.util.checks import check_choice, check_int

__all__ = ["ENCODERS", "PairClassifier", "pairings"]

ENCODERS = ("transformer", "lstm")
_WHO = "PairClassifier"


def pairings() -> list[str]:
    """The pairings :class:`PairClassifier` takes: every ``"pair"`` mechanism, and
    ``"cross"``."""
    return [*list_mechanisms(inputs="pair"), "cross"]


class BiLSTMEncoder(nn.Module):
    """A BiLSTM over the real tokens only (packed), ``d_model // 2`` units per direction;
    padded positions come out as zeros. Padding must be at the end of each row."""

    def __init__(self, d_model: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_model, d_model // 2, num_layers, batch_first=True,
                            bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None, name: str):
        B, N = x.shape[:2]
        if padding is None:
            lengths = torch.full((B,), N, dtype=torch.long)
        else:
            lengths = (~padding).sum(1).cpu()
            right = torch.arange(N, device=padding.device)[None] >= lengths.to(
                padding.device)[:, None]
            if bool((lengths == 0).any()) or not torch.equal(right, padding):
                raise ValueError(f"{_WHO}: encoder='lstm' needs {name} to mark padding at the "
                                 f"end of each row only, with at least one real token")
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=N)[0]


class PairClassifier(ModelBase):
    """Embeddings, an encoder per side, a pairing and an MLP (see the module docstring).

    ``mechanism`` is the transformer encoders' attention and, for ``pairing="cross"``, the
    cross-attention's; ``hidden`` is the co-attention's hidden size ``k`` and the MLP's
    width (default ``d_model``). ``positions`` (transformer only) defaults to sinusoidal;
    the LSTM reads order itself.
    """

    def __init__(self, vocab_size: int, num_classes: int, *,
                 pairing: str = "co_attention_parallel", encoder: str = "transformer",
                 mechanism: str = "sdpa", mechanism_kwargs: dict | None = None,
                 d_model: int = 64, num_heads: int = 4, num_layers: int = 1,
                 d_ff: int | None = None, dropout: float = 0.1, max_len: int = 128,
                 positions: str | None = None, pad_id: int = 0,
                 hidden: int | None = None) -> None:
        super().__init__()
        check_choice("pairing", pairing, pairings(), who=_WHO)
        check_choice("encoder", encoder, ENCODERS, who=_WHO)
        if encoder == "lstm" and (positions is not None or d_ff is not None):
            raise ValueError(f"{_WHO}: positions and d_ff are transformer options; "
                             f"encoder='lstm' takes neither (got positions={positions!r}, "
                             f"d_ff={d_ff!r})")
        positions = ("sinusoidal" if encoder == "transformer" else "none") if positions is None \
            else positions
        args = transformer_args(
            _WHO, mechanism=mechanism, mechanism_kwargs=mechanism_kwargs, d_model=d_model,
            num_heads=num_heads, num_layers=num_layers, d_ff=d_ff, dropout=dropout,
            max_len=max_len, positions=positions, pad_id=pad_id, causal=False,
            vocab={"vocab_size": vocab_size})
        if pairing == "cross":
            check_mechanism(_WHO, "mechanism", mechanism, mechanism_kwargs, cross=True)
        if encoder == "lstm" and d_model % 2:
            raise ValueError(f"{_WHO}: encoder='lstm' needs an even d_model (two directions "
                             f"of d_model // 2); got d_model={d_model}")
        check_int("num_classes", num_classes, low=2, who=_WHO)
        hidden = d_model if hidden is None else check_int("hidden", hidden, who=_WHO)
        self.config = {"vocab_size": vocab_size, "num_classes": num_classes,
                       "pairing": pairing, "encoder": encoder, **args,
                       "positions": positions if encoder == "transformer" else None,
                       "hidden": hidden}
        self.vocab_size, self.max_len = vocab_size, max_len
        self.pairing, self.encoder_kind = pairing, encoder
        self.embed = token_embedding(args, vocab_size)
        self.encoders = nn.ModuleList(self._encoder(args) for _ in range(2))  # a, b
        if pairing == "cross":
            self.pair = MultiheadAttention(d_model, num_heads, args["mechanism"],
                                           max_seq_len=max_len, **args["mechanism_kwargs"])
        else:
            self.pair = create(pairing, head_dim=d_model, hidden_dim=hidden)
        self.dropout = nn.Dropout(args["dropout"])
        self.mlp = nn.Sequential(nn.Linear(2 * d_model, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_classes))

    def _encoder(self, args: dict) -> nn.Module:
        if self.encoder_kind == "lstm":
            return BiLSTMEncoder(args["d_model"], args["num_layers"], args["dropout"])
        return transformer_stack(args)

    def _encode(self, side: int, ids, padding, name: str) -> torch.Tensor:
        x = self.embed(ids)
        enc = self.encoders[side]
        if self.encoder_kind == "lstm":
            return enc(x, padding, name)
        return enc(x, key_padding_mask=padding_for(enc.layers[0].self_attn.spec, padding,
                                                   False))

    def forward(self, a_ids: torch.Tensor, b_ids: torch.Tensor,
                a_padding: torch.Tensor | None = None, b_padding: torch.Tensor | None = None):
        for name, ids, pad in (("a_ids", a_ids, a_padding), ("b_ids", b_ids, b_padding)):
            check_ids(_WHO, name, ids, self.vocab_size, self.max_len)
            check_padding_mask(_WHO, name.replace("ids", "padding"), pad, ids)
        if a_ids.shape[0] != b_ids.shape[0]:
            raise ValueError(f"{_WHO}: a_ids and b_ids batch sizes differ: "
                             f"{tuple(a_ids.shape)} and {tuple(b_ids.shape)}")
        A = self._encode(0, a_ids, a_padding, "a_padding")
        Bx = self._encode(1, b_ids, b_padding, "b_padding")
        a_real = None if a_padding is None else ~a_padding
        if self.pairing == "cross":
            kpm = padding_for(self.pair.spec, b_padding, False)
            X = self.pair(A, Bx, key_padding_mask=kpm)
            a_hat, b_hat = _masked_mean(A, a_real), _masked_mean(X, a_real)
        else:
            b_real = None if b_padding is None else ~b_padding
            a_hat, b_hat = self.pair(A, Bx, a_mask=a_real, b_mask=b_real)
        return self.mlp(self.dropout(torch.cat([a_hat, b_hat], dim=-1)))


def _masked_mean(h: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``h`` ``(B, N, d)`` over the real positions (none real: zeros)."""
    if real is None:
        return h.mean(1)
    w = real.to(h.dtype).unsqueeze(-1)
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)
