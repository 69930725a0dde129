"""A decoder-only causal language model with any causal attention mechanism, and sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnlab.contract import check_ids, check_padding_mask
from attnlab.models.args import transformer_args
from attnlab.models.blocks import ModelBase, token_embedding, transformer_stack
from attnlab.registry import list_mechanisms
from attnlab.util.checks import check_float, check_int

__all__ = ["DecoderLM", "sample_next", "top_k_filter", "top_p_filter"]

_WHO = "DecoderLM"


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (last dim), set the rest to ``-inf``.
    Ties at the ``k``-th value are all kept."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    r"""Nucleus filtering (Holtzman et al. 2020, "The Curious Case of Neural Text
    Degeneration", eq. 2): keep the smallest set :math:`V^{(p)}` of most probable tokens with

    .. math:: \sum_{x \in V^{(p)}} P(x) \ge p,

    set the other logits to ``-inf``. In probability-sorted order token ``i`` is kept iff
    the mass *before* it is ``< p``, so the most probable token is always kept.
    """
    if p >= 1.0:
        return logits  # everything; also avoids dropping the tail to cumsum rounding
    probs = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16)
                          else logits, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None):
    """One token per row of ``logits`` ``(B, V)`` -> ``(B,)``: greedy (argmax) when
    ``temperature == 0``, else a draw from ``softmax(filtered logits / temperature)``,
    filtered by top-k then top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class DecoderLM(ModelBase):
    """GPT-style decoder: embeddings, pre-norm causal transformer, final LayerNorm, and an
    output layer tied to the input embedding (Press & Wolf 2017, "Using the Output
    Embedding to Improve Language Models"): ``logits = LN(h) E^T``.

    ``forward(ids (B, N), padding_mask=None) -> logits (B, N, vocab_size)``; logits at
    position ``t`` predict token ``t + 1`` and depend on tokens ``<= t`` only. Pad batches on
    the right: causal attention never lets a real token see the padding after it (a
    mechanism that can mask keys also takes left padding).
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
            max_len=max_len, positions=positions, pad_id=pad_id, causal=True,
            vocab={"vocab_size": vocab_size}, layer_mechanisms=layer_mechanisms)
        self.config = {"vocab_size": vocab_size, **args}
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = token_embedding(args, vocab_size)
        self.decoder = transformer_stack(args)

    @property
    def spec(self):
        return self.decoder.layers[0].self_attn.spec

    def _logits(self, ids, *, padding_mask=None, caches=None, offset: int = 0,
                positions=None):
        # The layers read positions only for RoPE (ALiBi was refused in forward): the
        # others are not handed them, so they do not check them once per layer.
        rope = positions is not None and self.config["positions"] == "rope"
        kw = {"positions": positions.to(ids.device)} if rope else {}
        h = self.decoder(self.embed(ids, offset, positions), key_padding_mask=padding_mask,
                         is_causal=True, kv_caches=caches, **kw)
        return F.linear(h, self.embed.weight)  # tied output layer

    def forward(self, ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None):
        """``positions`` ``(N,)``: the tokens' global positions when ``ids`` is one shard
        of longer sequences (context parallelism, :mod:`attnlab.train.context`); default
        ``0 .. N-1``. The embedding adds them (sinusoidal, learned) or every layer's RoPE
        rotates at them; attention takes the tokens in the order given (ring attention
        knows its shard's positions from its layout). ``positions="alibi"``, a bias by the
        distance in the order given, refuses them."""
        check_ids(_WHO, "ids", ids, self.vocab_size, self.max_len)
        padding_mask = check_padding_mask(_WHO, "padding_mask", padding_mask, ids)
        if positions is not None and self.config["positions"] == "alibi":
            raise ValueError(f"{_WHO}: positions (global token positions) cannot reach "
                             f"positions='alibi', a bias by the distance in the order given; "
                             f"use rope, sinusoidal, learned or none")
        return self._logits(ids, padding_mask=padding_mask, positions=positions)

    def can_cache(self) -> bool:
        """Whether :meth:`generate` can decode incrementally: every layer's mechanism keeps
        its keys (a KV cache) or its own bounded state (registry flag ``decode_state``)."""
        return all(layer.self_attn.spec.kv_cache or layer.self_attn.spec.decode_state
                   for layer in self.decoder.layers)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, eos_id: int | None = None,
                 use_cache: bool | None = None) -> torch.Tensor:
        """``prompt`` ``(B, T)`` followed by up to ``max_new_tokens`` sampled tokens.

        ``temperature=0`` is greedy; otherwise tokens are drawn from the softmax of the
        logits divided by ``temperature``, restricted to the ``top_k`` most probable and to
        the nucleus of mass ``top_p`` (see :func:`sample_next`). ``generator`` seeds the
        draws. A row that produced ``eos_id`` is finished: it gets ``pad_id`` afterwards,
        and generation stops when every row is finished.

        The context is at most ``max_len`` tokens: a longer one is cropped to its last
        ``max_len``. ``use_cache=None`` decodes incrementally when the mechanism allows it
        (a KV cache, registry flag ``kv_cache``, or its own state, flag ``decode_state``:
        a recurrent state or a rolling window), ``True`` requires it, ``False`` recomputes the whole
        (cropped) context each step. Both give the same tokens: once the context is full,
        the cache is refilled from the cropped context, exactly what recomputing sees.
        Runs in eval mode (no dropout) and restores the training mode afterwards.
        """
        check_ids(_WHO, "prompt", prompt, self.vocab_size, None)  # cropped to max_len below
        check_int("max_new_tokens", max_new_tokens, low=0, who=_WHO)
        temperature = check_float("temperature", temperature, low=0.0, high=float("inf"),
                                  high_inclusive=False, who=_WHO)
        check_int("top_k", top_k, nullable=True, who=_WHO)
        if top_p is not None:
            if check_float("top_p", top_p, low=0.0, high=1.0, high_inclusive=True, who=_WHO) == 0:
                raise ValueError(f"{_WHO}: top_p must be in (0, 1]; got {top_p!r}")
        if eos_id is not None:
            check_int("eos_id", eos_id, low=0, who=_WHO)
            if eos_id >= self.vocab_size:
                raise ValueError(f"{_WHO}: eos_id must be < vocab_size={self.vocab_size}; "
                                 f"got {eos_id}")
        if use_cache is not None and not isinstance(use_cache, bool):
            raise TypeError(f"{_WHO}: use_cache must be None or a bool; got {use_cache!r}")
        if use_cache and not self.can_cache():
            able = list_mechanisms(kv_cache=True) + list_mechanisms(decode_state=True)
            raise ValueError(f"{_WHO}: use_cache=True but mechanism {self.spec.name!r} cannot "
                             f"decode incrementally (registry flags kv_cache, decode_state); "
                             f"use use_cache=False or one of {sorted(able)}")
        cached = self.can_cache() if use_cache is None else use_cache
        was = self.training
        self.eval()
        try:
            return self._generate(prompt, max_new_tokens, cached, eos_id,
                                  dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                       generator=generator))
        finally:
            self.train(was)

    def _generate(self, prompt, max_new_tokens, cached, eos_id, sampling):
        out = prompt
        done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        caches = None
        for _ in range(max_new_tokens):
            context = out[:, -self.max_len:]
            if not cached:
                logits = self._logits(context)[:, -1]
            elif caches is not None and caches[0].length < self.max_len:
                # The cache holds context[:, :-1] at positions 0..T-1: feed the newest token.
                offset = caches[0].length
                logits = self._logits(context[:, -1:], caches=caches, offset=offset)[:, -1]
            else:
                # First step, or the context slid past max_len (absolute positions restart
                # at 0 for the cropped window, as when recomputing): prefill from scratch.

                caches = [layer.self_attn.new_cache() for layer in self.decoder.layers]
                logits = self._logits(context, caches=caches)[:, -1]
            token = sample_next(logits, **sampling)
            if eos_id is not None:
                token = token.masked_fill(done, self.config["pad_id"])
                done = done | (token == eos_id)
            out = torch.cat([out, token[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return out
