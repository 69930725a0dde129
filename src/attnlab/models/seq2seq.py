"""An encoder-decoder transformer (Vaswani et al. 2017) with pluggable attention.

The encoder's self-attention and the decoder's causal self-attention use ``mechanism``;
the decoder's cross-attention uses ``cross_mechanism`` (``"sdpa"`` by default, whatever
``mechanism`` is; any mechanism whose registry flag ``cross`` is set, since queries and keys
differ in length), configured on its own with ``cross_mechanism_kwargs``.
Token conventions of :mod:`attnlab.data.seq2seq` (``PAD = 0``, ``BOS = 1``, ``EOS = 2``)
fit it directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnlab.models.blocks import (
    ModelBase,
    TokenEmbedding,
    TransformerStack,
    attn_positions,
    check_ids,
    check_mechanism,
    check_padding_mask,
    transformer_args,
)
from attnlab.util.checks import check_int

__all__ = ["Seq2SeqTransformer"]

_WHO = "Seq2SeqTransformer"


class Seq2SeqTransformer(ModelBase):
    """Encoder-decoder transformer; the decoder's output layer is tied to its input
    embedding (Press & Wolf 2017).

    ``forward(src (B, S), tgt_in (B, T), src_padding_mask=None, tgt_padding_mask=None)``
    returns logits ``(B, T, tgt_vocab)``: position ``t`` predicts ``tgt[t + 1]`` from the
    source and ``tgt_in[:t + 1]`` (teacher forcing: ``tgt_in = [BOS] + y``, labels
    ``y + [EOS]``). Padding masks are ``True`` at padding.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, *, mechanism: str = "sdpa",
                 mechanism_kwargs: dict | None = None, cross_mechanism: str = "sdpa",
                 cross_mechanism_kwargs: dict | None = None, d_model: int = 128,
                 num_heads: int = 4, num_layers: int = 2, num_decoder_layers: int | None = None,
                 d_ff: int | None = None, dropout: float = 0.1, max_len: int = 512,
                 positions: str = "sinusoidal", pad_id: int = 0) -> None:
        super().__init__()
        args = transformer_args(
            _WHO, mechanism=mechanism, mechanism_kwargs=mechanism_kwargs, d_model=d_model,
            num_heads=num_heads, num_layers=num_layers, d_ff=d_ff, dropout=dropout,
            max_len=max_len, positions=positions, pad_id=pad_id, causal=True,
            vocab={"src_vocab": src_vocab, "tgt_vocab": tgt_vocab})
        cross_mechanism, cross_kwargs = check_mechanism(_WHO, "cross_mechanism", cross_mechanism,
                                                        cross_mechanism_kwargs, cross=True)
        check_int("num_decoder_layers", num_decoder_layers, nullable=True, who=_WHO)
        n_dec = num_layers if num_decoder_layers is None else num_decoder_layers
        self.config = {"src_vocab": src_vocab, "tgt_vocab": tgt_vocab, **args,
                       "cross_mechanism": cross_mechanism,
                       "cross_mechanism_kwargs": cross_kwargs,
                       "num_decoder_layers": num_decoder_layers}
        self.src_vocab, self.tgt_vocab, self.max_len, self.pad_id = (src_vocab, tgt_vocab,
                                                                     max_len, pad_id)
        drop = args["dropout"]
        common = dict(mechanism=args["mechanism"], mechanism_kwargs=args["mechanism_kwargs"],
                      d_ff=d_ff, dropout=drop, max_len=max_len,
                      attn_positions=attn_positions(positions))
        self.src_embed = TokenEmbedding(src_vocab, d_model, positions, max_len, drop)
        self.tgt_embed = TokenEmbedding(tgt_vocab, d_model, positions, max_len, drop)
        self.encoder = TransformerStack(num_layers, d_model, num_heads, **common)
        self.decoder = TransformerStack(n_dec, d_model, num_heads, cross=True,
                                        cross_mechanism=cross_mechanism,
                                        cross_mechanism_kwargs=cross_kwargs, **common)

    def encode(self, src: torch.Tensor, src_padding_mask: torch.Tensor | None = None):
        """Encoder states ``(B, S, d_model)``."""
        check_ids(_WHO, "src", src, self.src_vocab, self.max_len)
        src_padding_mask = check_padding_mask(_WHO, "src_padding_mask", src_padding_mask, src)
        return self.encoder(self.src_embed(src), key_padding_mask=src_padding_mask)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor,
               src_padding_mask: torch.Tensor | None = None,
               tgt_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, tgt_vocab)`` for ``tgt_in`` given the encoder states."""
        check_ids(_WHO, "tgt_in", tgt_in, self.tgt_vocab, self.max_len)
        tgt_padding_mask = check_padding_mask(_WHO, "tgt_padding_mask", tgt_padding_mask,
                                              tgt_in)
        if memory.shape[0] != tgt_in.shape[0]:
            raise ValueError(f"{_WHO}: src batch size {memory.shape[0]} does not match "
                             f"tgt_in batch size {tgt_in.shape[0]}")
        h = self.decoder(self.tgt_embed(tgt_in), key_padding_mask=tgt_padding_mask,
                         is_causal=True, memory=memory, memory_padding_mask=src_padding_mask)
        return F.linear(h, self.tgt_embed.weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor,
                src_padding_mask: torch.Tensor | None = None,
                tgt_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.encode(src, src_padding_mask)
        return self.decode(tgt_in, memory, src_padding_mask, tgt_padding_mask)

    def can_cache(self) -> bool:
        """Whether :meth:`greedy_decode` can decode one token per step with a KV cache.

        The decoder's self-attention must keep its keys/values (registry flag ``kv_cache``),
        and its cross-attention, then fed one query per step, must give that query what
        the whole target gives it: flag ``kv_cache`` too (one query equals its row of the
        full call). Not so for ``luong_monotonic``, whose window follows the query's index,
        which a one-token call does not know.
        """
        layer = self.decoder.layers[0]
        self_spec = layer.self_attn.spec
        return (self_spec.kv_cache or self_spec.decode_state) and layer.cross_attn.spec.kv_cache

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_len: int, bos_id: int, eos_id: int,
                      src_padding_mask: torch.Tensor | None = None, *,
                      use_cache: bool | None = None) -> torch.Tensor:
        """Greedy decoding: ``(B, 1 + L)`` starting with ``bos_id``, ``L <= max_len``
        generated tokens; a row that produced ``eos_id`` gets ``pad_id`` afterwards and
        decoding stops once every row has. The decoder reads at most ``max_len`` tokens
        (``BOS`` and all but the last generated one), so ``max_len`` may be the model's.

        The source is encoded once. ``use_cache=None`` keeps the decoder's self-attention
        keys/values in a KV cache when the mechanism allows it (``True`` requires it,
        ``False`` reruns the decoder on the whole prefix each step); the tokens are the
        same. Eval mode, restored afterwards.
        """
        check_int("max_len", max_len, who=_WHO)
        if max_len > self.max_len:
            raise ValueError(f"{_WHO}: greedy_decode max_len must be <= the model's "
                             f"max_len={self.max_len}; got max_len={max_len}")
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id)):
            check_int(name, v, low=0, who=_WHO)
            if v >= self.tgt_vocab:
                raise ValueError(f"{_WHO}: {name} must be < tgt_vocab={self.tgt_vocab}; "
                                 f"got {v}")
        if use_cache is not None and not isinstance(use_cache, bool):
            raise TypeError(f"{_WHO}: use_cache must be None or a bool; got {use_cache!r}")
        if use_cache and not self.can_cache():
            layer = self.decoder.layers[0]
            which, spec = "mechanism", layer.self_attn.spec
            if spec.kv_cache or spec.decode_state:  # then the cross-attention cannot
                which, spec = "cross_mechanism", layer.cross_attn.spec
            raise ValueError(f"{_WHO}: use_cache=True but {which} {spec.name!r} cannot decode "
                             f"with a KV cache (registry flag kv_cache); use use_cache=False")
        cached = self.can_cache() if use_cache is None else use_cache
        was = self.training
        self.eval()
        try:
            memory = self.encode(src, src_padding_mask)
            out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
            done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
            caches = None
            if cached:  # a KVCache, or the mechanism's own state (StateCache)
                caches = [layer.self_attn.new_cache() for layer in self.decoder.layers]
            for t in range(max_len):
                if caches is None:
                    logits = self.decode(out, memory, src_padding_mask)
                else:  # only the newest token; its predecessors' keys/values are cached
                    h = self.decoder(self.tgt_embed(out[:, -1:], t), is_causal=True,
                                     memory=memory, memory_padding_mask=src_padding_mask,
                                     kv_caches=caches)
                    logits = F.linear(h, self.tgt_embed.weight)
                token = logits[:, -1].argmax(-1).masked_fill(done, self.pad_id)
                done = done | (token == eos_id)
                out = torch.cat([out, token[:, None]], dim=1)
                if bool(done.all()):
                    break
        finally:
            self.train(was)
        return out
