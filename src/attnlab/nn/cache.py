"""A key/value cache for incremental (autoregressive) decoding with
:class:`attnlab.nn.MultiheadAttention`.

A causal layer's output for token ``t`` depends on the keys and values of tokens
``<= t`` only, and those never change once computed: decoding one token at a time can
keep them and project only the new tokens. With ``kv_cache=KVCache()`` the layer
projects the new tokens' keys and values, rotates them at their absolute positions
(RoPE), appends them here and attends the new queries to everything cached::

    cache = KVCache()
    y0 = mha(prompt, kv_cache=cache)                # prefill: T = 0, causal
    y1 = mha(next_token, kv_cache=cache)            # (B, 1, E): attends T + 1 keys

which equals ``mha(torch.cat([prompt, next_token], 1), is_causal=True)[:, -1:]`` for
every mechanism whose spec has ``kv_cache=True``. One cache belongs to one layer (it
holds that layer's projected keys and values); a model keeps one per layer.

A mechanism that promises a bounded decoding cost (spec ``decode_state``: ``linear``,
``performer``, the gated recurrences, the windows) decodes with :class:`StateCache`
instead, the same way: it holds what :meth:`attnlab.Mechanism.decode` returned, a
recurrent state ``S = sum phi(k) v^T`` or a rolling window, whose size does not grow with
the sequence. :func:`new_cache` gives the cache a mechanism decodes with.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch

from attnlab.contract import format_shape
from attnlab.registry import MechanismSpec, list_mechanisms

__all__ = ["KVCache", "StateCache", "check_decoding", "check_state_call", "decoding_mask",
           "new_cache", "state_nbytes"]


@dataclass
class KVCache:
    """Projected keys/values (after RoPE) of the positions seen so far, for one layer."""

    k: torch.Tensor | None = None  # (B, Hkv, T, D)
    v: torch.Tensor | None = None  # (B, Hkv, T, Dv)

    def __post_init__(self) -> None:
        if (self.k is None) != (self.v is None):
            raise ValueError(f"KVCache: k and v must both be given or both be None; got "
                             f"k={'None' if self.k is None else format_shape(self.k)}, "
                             f"v={'None' if self.v is None else format_shape(self.v)}")
        if self.k is not None:
            self._check(self.k, self.v, "KVCache")

    @property
    def length(self) -> int:
        """Positions cached, ``T`` (0 when empty)."""
        return 0 if self.k is None else self.k.shape[2]

    @property
    def batch_size(self) -> int | None:
        """``B`` of the cached tensors (``None`` when empty)."""
        return None if self.k is None else self.k.shape[0]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the keys ``(B, Hkv, n, D)`` and values ``(B, Hkv, n, Dv)`` of ``n`` new
        positions; returns the full cached ``k, v`` (``T + n`` positions)."""
        self._check(k, v, "KVCache.append")
        if self.k is None:
            self.k, self.v = k, v
            return k, v
        for name, new, old in (("k", k, self.k), ("v", v, self.v)):
            # Every dim but the length must match what is cached (same layer, same batch).
            if (new.shape[:2], new.shape[3]) != (old.shape[:2], old.shape[3]) \
                    or new.dtype != old.dtype or new.device != old.device:
                raise ValueError(
                    f"KVCache.append: {name} {format_shape(new)} {new.dtype} on {new.device} "
                    f"does not continue the cached {format_shape(old)} {old.dtype} on "
                    f"{old.device} (expected (B, Hkv, n, {old.shape[3]}) with B={old.shape[0]}"
                    f", Hkv={old.shape[1]}); a cache serves one layer and one batch")
        self.k = torch.cat([self.k, k], dim=2)
        self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reset(self) -> None:
        """Forget every position (start a new sequence)."""
        self.k = self.v = None

    @staticmethod
    def _check(k, v, who: str) -> None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{who}: {name} must be a torch.Tensor; got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{who}: {name} must be 4-D (B, Hkv, T, D); got "
                                 f"{t.dim()}-D shape {format_shape(t)}")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"{who}: k {format_shape(k)} and v {format_shape(v)} must agree "
                             f"in (B, Hkv, T)")


def state_nbytes(state: Any) -> int:
    """Bytes of the tensors in a decoding state (nested dicts, tuples, lists, dataclasses)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(x) for x in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(x) for x in state)
    if is_dataclass(state) and not isinstance(state, type):
        return sum(state_nbytes(getattr(state, f.name)) for f in fields(state))
    return 0


@dataclass
class StateCache:
    """What :meth:`attnlab.Mechanism.decode` returned for one layer: its bounded decoding
    state after ``length`` positions (``None`` before the first call)."""

    state: Any = None
    length: int = 0
    batch_size: int | None = None

    def update(self, state: Any, n: int, batch: int) -> None:
        """The state after ``n`` more positions of a batch of ``batch`` sequences."""
        self.state, self.length, self.batch_size = state, self.length + n, batch

    @property
    def nbytes(self) -> int:
        """Bytes the state holds (flat in the sequence length: that is its promise)."""
        return state_nbytes(self.state)

    def reset(self) -> None:
        """Forget every position (start a new sequence)."""
        self.state, self.length, self.batch_size = None, 0, None


def new_cache(spec: MechanismSpec):
    """The cache a layer with mechanism ``spec`` decodes with: :class:`KVCache` (spec
    ``kv_cache``), :class:`StateCache` (spec ``decode_state``); a ``ValueError`` if none."""
    if spec.kv_cache:
        return KVCache()
    if spec.decode_state:
        return StateCache()
    raise ValueError(f"mechanism {spec.name!r} cannot decode incrementally (registry flags "
                     f"kv_cache and decode_state are both False); use one of "
                     f"{list_mechanisms(kv_cache=True) + list_mechanisms(decode_state=True)}")


def check_decoding(cache, spec: MechanismSpec, self_attn: bool, key_padding_mask, is_causal,
                   batch: int) -> int:
    """:class:`~attnlab.nn.MultiheadAttention`'s checks of a ``kv_cache`` call; returns
    the cache's length ``T`` (where the new tokens start)."""
    w = "MultiheadAttention: "
    if not isinstance(cache, (KVCache, StateCache)):
        raise TypeError(f"{w}kv_cache must be an attnlab.nn.KVCache, an attnlab.nn.StateCache "
                        f"or None; got {type(cache).__name__}")
    want = KVCache if spec.kv_cache else StateCache if spec.decode_state else None
    if want is None:
        raise ValueError(f"{w}mechanism {spec.name!r} cannot decode with a kv_cache (one query "
                         f"attending every cached key is not its causal row, and it keeps no "
                         f"decoding state); use one of {list_mechanisms(kv_cache=True)} "
                         f"(KVCache) or {list_mechanisms(decode_state=True)} (StateCache)")
    if not isinstance(cache, want):
        raise TypeError(f"{w}mechanism {spec.name!r} decodes with an attnlab.nn."
                        f"{want.__name__} (attnlab.nn.new_cache(spec) gives it); got "
                        f"{type(cache).__name__}")
    if not self_attn:
        raise ValueError(f"{w}kv_cache is for causal self-attention: key and value must be "
                         f"None (they come from the cache); got key")
    if key_padding_mask is not None:
        raise ValueError(f"{w}key_padding_mask is not supported with a kv_cache (decoding "
                         f"keeps no padded keys); pass key_padding_mask=None")
    if is_causal is False:
        raise ValueError(f"{w}kv_cache decoding is causal; got is_causal=False")
    if cache.length and cache.batch_size != batch:
        raise ValueError(f"{w}query batch size {batch} does not match the kv_cache's "
                         f"{cache.batch_size} (reset() it for a new batch)")
    return cache.length


def check_state_call(spec: MechanismSpec, attn_mask, need_weights: bool, positions,
                     who: str) -> None:
    """What decoding with a :class:`StateCache` cannot take: the state has absorbed the
    keys, so no mask (nor ALiBi's bias on them) can reach them, and no weights are formed."""
    for bad, what in ((attn_mask is not None, "attn_mask"),
                      (need_weights, "need_weights=True"),
                      (positions == "alibi", "positions='alibi' (a bias on the keys)")):
        if bad:
            raise ValueError(f"{who}decoding with a StateCache ({spec.name!r} keeps a state, "
                             f"not its keys) cannot take {what}")


def decoding_mask(T: int, n: int, device=None) -> tuple[torch.Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for ``n`` new queries at positions ``T .. T+n-1`` over
    ``T + n`` keys: query ``i`` sees the keys ``<= T + i`` (bottom-right aligned)."""
    if n == 1:  # the newest token sees every key
        return None, False
    if T == 0:  # the ordinary top-left causal case: leave it to the mechanism's fast path
        return None, True
    return torch.ones(n, T + n, dtype=torch.bool, device=device).tril(diagonal=T), False
