"""An encoder-decoder transformer (Vaswani et al. 2017) with pluggable attention.

The encoder's self-attention and the decoder's causal self-attention use ``mechanism``
(the decoder's may be another, ``decoder_mechanism``, e.g. to pair an encoder-only
mechanism without a causal form, such as ``linformer``, with a causal decoder);
the decoder's cross-attention uses ``cross_mechanism`` (``"sdpa"`` by default, whatever
``mechanism`` is; any mechanism whose registry flag ``cross`` is set, since queries and keys
differ in length), configured on its own with ``cross_mechanism_kwargs``.
Token conventions of :mod:`attnlab.data.seq2seq` (``PAD = 0``, ``BOS = 1``, ``EOS = 2``)
fit it directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnlab.contract import check_ids, check_padding_mask
from attnlab.models.args import attn_positions, check_mechanism, transformer_args
from attnlab.models.blocks import ModelBase, TokenEmbedding, TransformerStack
from attnlab.nn.cache import KVCache
from attnlab.util.checks import check_bool, check_float, check_int

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
                 positions: str = "sinusoidal", pad_id: int = 0,
                 decoder_mechanism: str | None = None,
                 decoder_mechanism_kwargs: dict | None = None) -> None:
        super().__init__()
        own_decoder = decoder_mechanism is not None  # else the decoder uses ``mechanism``
        args = transformer_args(
            _WHO, mechanism=mechanism, mechanism_kwargs=mechanism_kwargs, d_model=d_model,
            num_heads=num_heads, num_layers=num_layers, d_ff=d_ff, dropout=dropout,
            max_len=max_len, positions=positions, pad_id=pad_id, causal=not own_decoder,
            vocab={"src_vocab": src_vocab, "tgt_vocab": tgt_vocab})
        dec_mech, dec_kwargs = args["mechanism"], args["mechanism_kwargs"]
        if own_decoder:
            dec_mech, dec_kwargs = check_mechanism(_WHO, "decoder_mechanism", decoder_mechanism,
                                                   decoder_mechanism_kwargs, causal=True)
        elif decoder_mechanism_kwargs is not None:
            raise ValueError(f"{_WHO}: decoder_mechanism_kwargs given without "
                             f"decoder_mechanism; got {decoder_mechanism_kwargs!r}")
        cross_mechanism, cross_kwargs = check_mechanism(_WHO, "cross_mechanism", cross_mechanism,
                                                        cross_mechanism_kwargs, cross=True)
        check_int("num_decoder_layers", num_decoder_layers, nullable=True, who=_WHO)
        n_dec = num_layers if num_decoder_layers is None else num_decoder_layers
        self.config = {"src_vocab": src_vocab, "tgt_vocab": tgt_vocab, **args,
                       "cross_mechanism": cross_mechanism,
                       "cross_mechanism_kwargs": cross_kwargs,
                       "num_decoder_layers": num_decoder_layers}
        if own_decoder:  # only when given: configs saved without it rebuild as before
            self.config.update(decoder_mechanism=dec_mech, decoder_mechanism_kwargs=dec_kwargs)
        self.src_vocab, self.tgt_vocab, self.max_len, self.pad_id = (src_vocab, tgt_vocab,
                                                                     max_len, pad_id)
        drop = args["dropout"]
        common = dict(mechanism=args["mechanism"], mechanism_kwargs=args["mechanism_kwargs"],
                      d_ff=d_ff, dropout=drop, max_len=max_len,
                      attn_positions=attn_positions(positions))
        self.src_embed = TokenEmbedding(src_vocab, d_model, positions, max_len, drop)
        self.tgt_embed = TokenEmbedding(tgt_vocab, d_model, positions, max_len, drop)
        self.encoder = TransformerStack(num_layers, d_model, num_heads, **common)
        common.update(mechanism=dec_mech, mechanism_kwargs=dec_kwargs)
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

    def _check_decode(self, what: str, max_len, bos_id, eos_id) -> None:
        check_int("max_len", max_len, who=_WHO)
        if max_len > self.max_len:
            raise ValueError(f"{_WHO}: {what} max_len must be <= the model's "
                             f"max_len={self.max_len}; got max_len={max_len}")
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id)):
            check_int(name, v, low=0, who=_WHO)
            if v >= self.tgt_vocab:
                raise ValueError(f"{_WHO}: {name} must be < tgt_vocab={self.tgt_vocab}; "
                                 f"got {v}")

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
        self._check_decode("greedy_decode", max_len, bos_id, eos_id)
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

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, max_len: int, bos_id: int, eos_id: int,
                    beam_size: int = 4, src_padding_mask: torch.Tensor | None = None,
                    length_penalty: float = 1.0, *, return_scores: bool = False,
                    use_cache: bool | None = None):
        """Beam search (batched): the hypothesis ``Y`` of highest
        ``log P(Y | X) / |Y|^alpha`` found, ``alpha = length_penalty`` (``|Y|`` counts the
        EOS; 0 ranks by log-probability alone, 1 by its mean per token).

        Each step extends the ``beam_size`` live prefixes of a row by every token and keeps
        the ``beam_size`` best by log-probability (prefixes of one length: the penalty does
        not change their order); a candidate ending in ``eos_id`` among those best is set
        aside as finished (at most ``beam_size`` kept, by penalised score), and the next
        best non-EOS candidates fill the beam. A row stops when it has ``beam_size``
        finished hypotheses and none of its live prefixes scores above the worst of them;
        after ``max_len`` tokens the live prefixes compete, unfinished, with the finished.
        Ties go to the lower (beam, token) index, so ``beam_size=1`` is
        :meth:`greedy_decode` token for token.

        Returns ``(B, 1 + L)`` in :meth:`greedy_decode`'s layout (``bos_id``, then the best
        hypothesis, ``pad_id`` after its ``eos_id``); with ``return_scores`` also its
        log-probabilities ``log P(Y | X)`` (``(B,)`` float64, unpenalised).
        ``use_cache=None`` decodes one token a step with a KV cache whose rows follow the
        beams when :meth:`can_cache` and every decoder layer keeps plain keys/values
        (``False``, or a mechanism's own state, reruns the decoder on the whole prefix).
        Eval mode, restored afterwards.
        """
        self._check_decode("beam_search", max_len, bos_id, eos_id)
        k = check_int("beam_size", beam_size, who=_WHO)
        alpha = check_float("length_penalty", length_penalty, low=0.0, who=_WHO)
        check_bool("return_scores", return_scores, who=_WHO)
        if use_cache is not None:
            check_bool("use_cache", use_cache, who=_WHO)
        was = self.training
        self.eval()
        try:
            hyps = self._beam(src, src_padding_mask, max_len, bos_id, eos_id, k, alpha,
                              use_cache is not False)
        finally:
            self.train(was)
        width = max(len(h[2]) for h in hyps)
        out = torch.full((src.shape[0], 1 + width), self.pad_id, dtype=torch.long,
                         device=src.device)
        out[:, 0] = bos_id
        for i, (_, _, tokens) in enumerate(hyps):
            out[i, 1:1 + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        if not return_scores:
            return out
        return out, torch.tensor([h[1] for h in hyps], dtype=torch.float64)

    def _beam(self, src, src_padding_mask, max_len, bos_id, eos_id, k, alpha, cached):
        """The best ``(penalised score, log-prob, tokens)`` of every row (see beam_search)."""
        memory = self.encode(src, src_padding_mask).repeat_interleave(k, 0)
        mask = (None if src_padding_mask is None
                else src_padding_mask.repeat_interleave(k, 0))
        B, V = src.shape[0], self.tgt_vocab
        seqs = torch.full((B * k, 1), bos_id, dtype=torch.long, device=src.device)
        scores = torch.full((B, k), float("-inf"), dtype=torch.float64, device=src.device)
        scores[:, 0] = 0.0  # one live prefix at first: the other beams would repeat it
        finished: list[list[tuple]] = [[] for _ in range(B)]
        done = [False] * B
        caches = None
        if cached and self.can_cache():
            caches = [layer.self_attn.new_cache() for layer in self.decoder.layers]
            caches = caches if all(isinstance(c, KVCache) for c in caches) else None
        for t in range(max_len):
            if caches is None:
                logits = self.decode(seqs, memory, mask)[:, -1]
            else:  # the newest token only; the beams' earlier keys/values are cached
                h = self.decoder(self.tgt_embed(seqs[:, -1:], t), is_causal=True,
                                 memory=memory, memory_padding_mask=mask, kv_caches=caches)
                logits = F.linear(h[:, -1], self.tgt_embed.weight)
            logp = F.log_softmax(logits.double(), dim=-1)
            cand = (scores[..., None] + logp.view(B, k, V)).view(B, k * V)
            top, idx = cand.sort(dim=-1, descending=True, stable=True)
            n = min(2 * k, k * V)  # k of them may end in EOS: 2k always refill the beam
            top, idx = top[:, :n].tolist(), idx[:, :n].tolist()
            pick = []
            for b in range(B):
                live = [] if done[b] else self._step_row(
                    top[b], idx[b], seqs[b * k:(b + 1) * k], finished[b], k, V, eos_id,
                    t + 1, alpha)
                if not done[b]:
                    done[b] = _row_done(live, finished[b], k, t + 1, alpha)
                live += [(0, self.pad_id, float("-inf"))] * (k - len(live))
                pick += [(b * k + j, tok, sc) for j, tok, sc in live]
            rows = torch.tensor([p[0] for p in pick], device=src.device)
            toks = torch.tensor([p[1] for p in pick], device=src.device)
            seqs = torch.cat([seqs[rows], toks[:, None]], dim=1)
            for c in caches or ():  # each beam continues the prefix it extends
                c.k, c.v = c.k[rows], c.v[rows]
            scores = torch.tensor([p[2] for p in pick], dtype=torch.float64,
                                  device=src.device).view(B, k)
            if all(done):
                break
        best = []
        for b in range(B):
            pool = list(finished[b])
            if not done[b]:  # out of steps: the live prefixes are hypotheses too
                for j, s in enumerate(scores[b].tolist()):
                    if s != float("-inf"):
                        pool.append((s / max_len ** alpha, s, seqs[b * k + j, 1:].tolist()))
            best.append(max(pool, key=lambda h: h[0]))  # max keeps the first of ties
        return best

    @staticmethod
    def _step_row(top, idx, seqs, finished, k, V, eos_id, length, alpha):
        """One row's step: finished hypotheses set aside, the next live ``(beam, token,
        log-prob)`` returned (best first)."""
        live = []
        for rank, (s, i) in enumerate(zip(top, idx, strict=True)):
            if s == float("-inf"):
                break  # only impossible candidates (beams never filled) from here on
            beam, token = divmod(i, V)
            if token == eos_id:
                if rank < k:  # an EOS beyond the k best would not have been in the beam
                    finished.append((s / length ** alpha, s, seqs[beam, 1:].tolist() + [token]))
                    finished.sort(key=lambda h: -h[0])  # stable: earlier first among ties
                    del finished[k:]
                continue
            live.append((beam, token, s))
            if len(live) == k:
                break
        return live


def _row_done(live, finished, k, length, alpha) -> bool:
    """Whether a row can stop: ``k`` finished and no live prefix, penalised at its current
    length, above the worst of them (the usual heuristic; exact for ``alpha = 0``, where a
    prefix's score can only fall)."""
    if not live:
        return True
    return len(finished) >= k and finished[-1][0] >= live[0][2] / length ** alpha
