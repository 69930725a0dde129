"""Multi-head attention around any registered mechanism.

The layer owns what every mechanism needs and none implements: input/output
projections, the head split, grouped-query sharing of key/value heads, RoPE/ALiBi
positions, padding masks, a KV cache for decoding (:mod:`attnlab.nn.cache`) and dropout
in training mode. The score computation itself is whatever ``attnlab.create(mechanism,
...)`` builds, so a mechanism added to the registry plugs in without changes here.
"""

from __future__ import annotations

import torch
from torch import nn

from attnlab.contract import format_shape
from attnlab.nn.cache import (
    KVCache,
    StateCache,
    check_decoding,
    check_state_call,
    decoding_mask,
    new_cache,
)
from attnlab.nn.layer_inputs import (
    check_input,
    check_layer_positions,
    head_sizes,
    positions_kind,
)
from attnlab.nn.length_fold import attend_folded, length_fold
from attnlab.nn.masks import combine, layer_mask
from attnlab.nn.options import ConvInputs, OutputGate, hybrid_sugar
from attnlab.nn.positional import RotaryEmbedding
from attnlab.registry import CONTEXT_HPARAMS, REQUIRED, create, get
from attnlab.util.checks import check_bool, check_float, check_int

__all__ = ["MultiheadAttention"]

_WHO = "MultiheadAttention"
_W = f"{_WHO}: "  # every error names the layer


class MultiheadAttention(nn.Module):
    r"""Multi-head attention (Vaswani et al. 2017, §3.2.2) with a pluggable mechanism.

    .. math:: \mathrm{MHA}(X_q, X_k, X_v) = \mathrm{Concat}(h_1, \dots, h_H) W^O, \quad
        h_i = \mathrm{mechanism}(X_q W^Q_i, X_k W^K_{g(i)}, X_v W^V_{g(i)})

    where ``g(i) = i // (num_heads // num_kv_heads)`` maps query head ``i`` to its shared
    key/value head (grouped-query attention, Ainslie et al. 2023; ``num_kv_heads=1`` is
    multi-query attention, Shazeer 2019).

    Args:
        embed_dim: model width ``E``; ``head_dim = E // num_heads``.
        num_heads: query heads ``H``.
        mechanism: a registered name (``attnlab.list_mechanisms()``), or
            ``"hybrid:<heads>"`` for ``"hybrid"`` with ``heads=<heads>``. Extra keyword
            arguments are its hyperparameters; ``head_dim``, ``num_heads`` and
            ``max_seq_len`` are filled in from the layer when the mechanism declares them.
            The layer follows the built module's ``spec`` (a hybrid's: its parts' AND).
        num_kv_heads: key/value heads; must divide ``num_heads`` (default ``num_heads``).
        kdim, vdim: feature sizes of the key and value inputs (default ``embed_dim``).
        bias: biases on the four projections.
        dropout: dropout on the attention weights, applied in training mode only.
        is_causal: default for ``forward(is_causal=None)``.
        positions: ``"rope"`` (rotary, on q and k), ``"alibi"`` (linear bias) or ``None``.
        rope_base: RoPE's base ``theta``.
        max_seq_len: longest sequence allowed (also sizes the RoPE tables up front).
        batch_first: ``True``: inputs ``(B, N, E)``. ``False`` takes ``(N, B, E)`` as
            ``torch.nn.MultiheadAttention`` does, by transposing; the output follows suit.
        output_gate: gate each head's output elementwise with ``sigmoid(X W_h + b_h)`` of
            the query input before ``out_proj`` (Qiu et al. 2025; :class:`OutputGate`).
        conv_kernel_size: convolve the query, key and value inputs along the sequence
            with a depthwise kernel of this many taps before their projections (CvT, Wu
            et al. 2021; :class:`ConvInputs`): causal calls look back only.

    Masks (mind the two opposite bool conventions, each kept from its origin):

    * ``key_padding_mask`` ``(B, Nk)``: bool with ``True`` = padding, *ignore this key*
      (``torch.nn.MultiheadAttention``'s convention), or float, added to the scores.
      Mechanisms that take no arbitrary mask but ``key_padding`` (kernel, low-rank,
      hashing) get it, bool only and alone, as a ``(B, 1, 1, Nk)`` mask.
    * ``attn_mask``: attnlab's contract, bool with ``True`` = *may attend* (the opposite
      of torch's ``attn_mask``) or float additive, broadcastable to ``(B, H, Nq, Nk)``.

    A query row whose keys are all masked gives zeros (the contract), not NaN as torch's.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mechanism: str = "sdpa",
        *,
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        is_causal: bool = False,
        positions: str | None = None,
        rope_base: float = 10000.0,
        max_seq_len: int | None = None,
        batch_first: bool = True,
        output_gate: bool = False,
        conv_kernel_size: int | None = None,
        device=None,
        dtype=None,
        **hparams,
    ) -> None:
        super().__init__()
        E, H, Hkv = head_sizes(embed_dim, num_heads, num_kv_heads)
        self.embed_dim, self.num_heads, self.num_kv_heads = E, H, Hkv
        self.dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False,
                                   who=_WHO)
        self.head_dim = E // H
        self.kdim = E if kdim is None else check_int("kdim", kdim, who=_WHO)
        self.vdim = E if vdim is None else check_int("vdim", vdim, who=_WHO)
        self.max_seq_len = check_int("max_seq_len", max_seq_len, nullable=True, who=_WHO)
        self.is_causal = check_bool("is_causal", is_causal, who=_WHO)
        self.batch_first = check_bool("batch_first", batch_first, who=_WHO)
        self.positions = positions_kind(positions)
        self.conv_kernel_size = check_int("conv_kernel_size", conv_kernel_size, nullable=True,
                                          who=_WHO)
        mechanism, hparams = hybrid_sugar(mechanism, hparams, _W)
        self.spec = get(mechanism)  # unknown name -> ValueError with close matches
        if self.spec.inputs != "qkv":
            raise ValueError(f"{_W}mechanism {self.spec.name!r} takes {self.spec.inputs} "
                             f"inputs, not a layer's (q, k, v); choose one of "
                             f"attnlab.list_mechanisms() (the graph and pair mechanisms "
                             f"have their own models: attnlab.models)")
        self.attn = create(self.spec.name, **self._mechanism_hparams(hparams))
        if self.attn.spec is not type(self.attn).spec:  # its own flags (hybrid: parts' AND)
            self.spec = self.attn.spec
        cross = self.kdim != E or self.vdim != E
        self._check_spec(self.is_causal, {"positions='alibi'": self.positions == "alibi"},
                         f"kdim={self.kdim}, vdim={self.vdim} != embed_dim={E}" if cross else "")
        if device is not None or dtype is not None:
            self.attn.to(device=device, dtype=dtype)
        self._build(check_bool("bias", bias, who=_WHO), rope_base, device, dtype,
                    check_bool("output_gate", output_gate, who=_WHO))
        self.reset_parameters()

    def _build(self, bias: bool, rope_base: float, device, dtype, output_gate: bool) -> None:
        """The four projections, the options (gate, convolutions), and RoPE's rotation
        when ``positions="rope"``."""
        E, d_kv = self.embed_dim, self.num_kv_heads * self.head_dim
        f = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(E, E, **f)
        self.k_proj = nn.Linear(self.kdim, d_kv, **f)
        self.v_proj = nn.Linear(self.vdim, d_kv, **f)
        self.out_proj = nn.Linear(E, E, **f)
        self.gate = OutputGate(E, self.num_heads, self.head_dim, **f) if output_gate else None
        self.conv = None if self.conv_kernel_size is None else ConvInputs(
            self.conv_kernel_size, (E, self.kdim, self.vdim), device=device, dtype=dtype)
        self.rotary = None
        if self.positions == "rope":
            if self.head_dim % 2:
                raise ValueError(f"{_W}positions='rope' needs an even head_dim = embed_dim // "
                                 f"num_heads; got head_dim={self.head_dim}")
            self.rotary = RotaryEmbedding(self.head_dim, rope_base)
            if self.max_seq_len is not None:  # build the tables once, up front
                self.rotary.tables(self.max_seq_len, device)

    def reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation: Xavier inputs, zero biases.
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        for option in filter(None, (self.gate, self.conv)):
            option.reset_parameters()

    def _mechanism_hparams(self, hparams: dict) -> dict:
        # Learnable mechanisms (e.g. additive) size their parameters from these.
        ours = {"head_dim": self.head_dim, "num_heads": self.num_heads,
                "max_seq_len": self.max_seq_len}
        declared = {h.name: h for h in self.spec.hparams}
        out = dict(hparams)
        for name in (n for n in CONTEXT_HPARAMS if n in declared):
            if name in out and ours[name] is not None and out[name] != ours[name]:
                raise ValueError(f"{_W}mechanism hyperparameter {name}={out[name]!r} "
                                 f"contradicts the layer's {name}={ours[name]}; leave it out")
            if name not in out and ours[name] is not None:
                out[name] = ours[name]
            elif name not in out and declared[name].default is REQUIRED:
                raise ValueError(f"{_W}mechanism {self.spec.name!r} needs {name}; pass "
                                 f"MultiheadAttention(..., {name}=...)")
        return out

    def _check_spec(self, causal: bool, masks: dict, cross: str) -> None:
        """Refuse early what the mechanism's registry flags say it cannot do."""
        s = self.spec
        if causal and not s.causal:
            raise ValueError(f"{_W}mechanism {s.name!r} has no causal form; "
                             f"is_causal=True is not supported")
        for arg, given in masks.items():
            padding_only = arg == "key_padding_mask" and s.key_padding  # (B, 1, 1, Nk) bool
            if given and not s.arbitrary_mask and not padding_only:
                raise ValueError(f"{_W}mechanism {s.name!r} cannot take arbitrary masks "
                                 f"(attn_mask); {arg} needs one")
        if cross and not s.cross:
            raise ValueError(f"{_W}mechanism {s.name!r} does not support cross-attention; "
                             f"got {cross}")

    def new_cache(self):
        """An empty cache for decoding with this layer: a :class:`~attnlab.nn.KVCache` or,
        for a mechanism with a bounded state, a :class:`~attnlab.nn.StateCache`."""
        return new_cache(self.spec)

    def extra_repr(self) -> str:
        extra = {"num_kv_heads": self.num_kv_heads, "positions": self.positions,
                 "is_causal": self.is_causal, "output_gate": self.gate is not None,
                 "conv_kernel_size": self.conv_kernel_size}
        defaults = {"num_kv_heads": self.num_heads, "positions": None, "is_causal": False,
                    "output_gate": False, "conv_kernel_size": None}
        return ", ".join([f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}",
                          f"mechanism={self.spec.name!r}"]
                         + [f"{k}={v!r}" for k, v in extra.items() if v != defaults[k]])

    def _check_input(self, name: str, x, dim: int, batch: int | None, proj: nn.Linear) -> None:
        check_input(_W, name, x, dim, batch, proj.weight.dtype, self.batch_first)

    def _mask(self, attn_mask, kpm, Nq: int, Nk: int, causal: bool, like: torch.Tensor,
              T: int, decoding: bool):
        """``(mask, is_causal)`` for the mechanism: attn_mask, key_padding_mask, ALiBi (query
        ``i`` at ``T + i``) and, when ``decoding``, the cache's causal constraint."""
        mask = layer_mask(attn_mask, kpm, full=(like.shape[0], self.num_heads, Nq, Nk),
                          spec=self.spec, alibi=self.positions == "alibi", causal=causal,
                          dtype=like.dtype, device=like.device, offset=T, who=_W)
        if not decoding:
            return mask, causal
        if self.positions == "alibi":  # ALiBi's causal bias (at offset T) is complete by itself
            return mask, False
        allowed, causal = decoding_mask(T, Nq, like.device)
        return combine(mask, allowed, like.dtype), causal

    def _length_fold(self, n: int):
        """The mechanism's shared ``(E, F)`` when mixing the key/value inputs along the length
        before ``k_proj``/``v_proj`` is valid and cheaper, else ``None``
        (:func:`attnlab.nn.length_fold.length_fold`)."""
        return length_fold(self.attn, n, rotary=self.rotary is not None,
                           d_in=max(self.kdim, self.vdim),
                           d_kv=self.num_kv_heads * self.head_dim)

    def _split(self, x: torch.Tensor, h: int) -> torch.Tensor:
        """``(B, N, h * D) -> (B, h, N, D)``."""
        return x.view(x.shape[0], x.shape[1], h, self.head_dim).transpose(1, 2)

    def _inputs(self, query, key, value):
        """``(query, key, value, self_attn)`` batch first, ``key``/``value`` filled in
        (``key=None``: self-attention, ``value=None``: ``key``); checks the query."""
        if key is None and value is not None:
            raise ValueError(f"{_W}value was given without key")
        self_attn = key is None
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) if isinstance(t, torch.Tensor) and t.dim() == 3
                                 else t for t in (query, key, value))
        self._check_input("query", query, self.embed_dim, None, self.q_proj)
        if self_attn and (self.kdim, self.vdim) != (self.embed_dim,) * 2:
            raise ValueError(f"{_W}key=None (self-attention) needs kdim == vdim == embed_dim; "
                             f"this layer has kdim={self.kdim}, vdim={self.vdim}: pass key")
        return query, key, value, self_attn

    def _check_call(self, query, key, value, self_attn: bool, T: int, causal: bool,
                    attn_mask, key_padding_mask, state: bool = False) -> int:
        """Keys and values, the lengths and what the mechanism supports; returns ``Nk``.
        ``state``: decoding with a StateCache, whose mechanism sees the new keys only."""
        B, Nq = query.shape[:2]
        if not self_attn:
            self._check_input("key", key, self.kdim, B, self.k_proj)
            self._check_input("value", value, self.vdim, B, self.v_proj)
            if value.shape[1] != key.shape[1]:
                raise ValueError(f"{_W}key and value lengths differ: key {format_shape(key)}, "
                                 f"value {format_shape(value)}")
        Nk = T + key.shape[1]
        if self.max_seq_len is not None and max(Nq, Nk) > self.max_seq_len:
            raise ValueError(f"{_W}sequence length {max(Nq, Nk)} exceeds "
                             f"max_seq_len={self.max_seq_len}")
        seen = key.shape[1] if state else Nk
        self._check_spec(causal, {"key_padding_mask": key_padding_mask is not None,
                                  "attn_mask": attn_mask is not None},
                         f"Nq={Nq} != Nk={seen}" if Nq != seen else "")
        return Nk

    def _attend(self, q, key, value, mask, causal: bool, at, kv_cache, dropout_p: float,
                need_weights: bool, effective: bool):
        """The mechanism on the projected keys and values (appended to ``kv_cache`` if any);
        ``at``: where the tokens sit, the first one's position (an int: a cache's length)
        or each one's (a ``(N,)`` tensor of ``positions``);
        ``Hkv < H`` heads go to it as they are, with ``enable_gqa``. ``effective``: the
        weights ``A`` with ``out = A v``, as ``attend(q, k, I)``: every mechanism here is
        linear in ``v``."""
        k = self._split(self.k_proj(key), self.num_kv_heads)
        v = self._split(self.v_proj(value), self.num_kv_heads)
        if self.rotary is not None:
            # Rotate the Hkv key heads, not H copies of them.
            q, k = (self.rotary(q, k, positions=at) if isinstance(at, torch.Tensor)
                    else self.rotary(q, k, at))
        gqa = self.num_kv_heads != self.num_heads
        if isinstance(kv_cache, StateCache):  # the mechanism's own state: no keys kept here
            out, state = self.attn.decode(q, k, v, kv_cache.state, enable_gqa=gqa)
            kv_cache.update(state, q.shape[2], q.shape[0])
            return out
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        res = self.attn(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                        need_weights=need_weights and not effective, enable_gqa=gqa)
        if not effective:
            return res
        Nk = k.shape[2]
        eye = torch.eye(Nk, dtype=v.dtype, device=v.device).expand(*v.shape[:2], Nk, Nk)
        return res, self.attn(q, k, eye, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

    def _run(self, q, key, value, mask, causal: bool, at, kv_cache, key_padding_mask,
             need_weights: bool):
        """The mechanism on ``q``: length-folded where valid and cheaper, else :meth:`_attend`."""
        dropout_p = self.dropout if self.training else 0.0
        effective = need_weights and not self.spec.returns_weights  # none of its own: A v
        if effective and not getattr(self.attn, "effective_weights", True):
            raise ValueError(f"{_W}mechanism {self.spec.name!r} has no attention weights: its "
                             f"output is A v for no (Nq, Nk) matrix A (it mixes or filters "
                             f"each feature apart); pass need_weights=False")
        fold = None if kv_cache is not None else self._length_fold(key.shape[1])
        if fold is None:
            return self._attend(q, key, value, mask, causal, at, kv_cache, dropout_p,
                                need_weights, effective)
        # Keys/values mixed along the length first: E (X W) = (E X) W.
        return attend_folded(self.attn, q, key, value, fold, (self.k_proj, self.v_proj),
                             lambda x: self._split(x, self.num_kv_heads),
                             key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                             effective=effective)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
        need_weights: bool = False,
        kv_cache: KVCache | StateCache | None = None,
        positions: torch.Tensor | None = None,
    ):
        """Attend; ``key=None`` is self-attention and ``value=None`` reuses ``key``.

        Returns the output ``(B, Nq, E)``, or ``(output, weights)`` with per-head weights
        ``(B, H, Nq, Nk)`` when ``need_weights`` (never averaged over heads). A mechanism
        that never forms its weights (``returns_weights`` False: kernel, low-rank, sparse,
        flash ...) gives its *effective* weights ``A`` with ``attend(q, k, v) = A v``, found
        by attending to ``v = I``: every registered mechanism is linear in ``v`` for fixed
        ``q, k``. That costs an extra ``(Nq, Nk)`` pass, without dropout: for inspection.

        ``kv_cache``: causal self-attention decoding (:class:`~attnlab.nn.KVCache`). The
        ``Nq`` new tokens sit at positions ``T .. T+Nq-1`` (``T = kv_cache.length``); their
        keys and values are appended to the cache and the queries attend all ``T + Nq``
        keys, query ``i`` those ``<= T + i``. RoPE and ALiBi use the absolute positions.
        Only mechanisms with ``kv_cache`` in their spec; ``attn_mask`` (``(Nq, T + Nq)``)
        may add to the causal constraint, ``key_padding_mask`` may not be given. A
        mechanism with ``decode_state`` decodes with a :class:`~attnlab.nn.StateCache` the
        same way (no ``attn_mask``, no weights, no ALiBi); :meth:`new_cache` gives the
        cache this layer's mechanism takes.

        ``positions`` ``(Nq,)``: the tokens' global positions in self-attention when the
        input is one shard of longer sequences, in any order (context parallelism); RoPE
        rotates at them (default ``0 .. N-1``, or after the cache). A layer without RoPE
        has no position of its own to place: it checks and then ignores them; ALiBi
        refuses them.
        """
        query, key, value, self_attn = self._inputs(query, key, value)
        B, Nq = query.shape[:2]
        # Flags first: a truthy non-bool must neither pass nor steer the checks below.
        is_causal = None if is_causal is None else check_bool("is_causal", is_causal, who=_WHO)
        need_weights = check_bool("need_weights", need_weights, who=_WHO)
        T = 0  # positions already cached: the new tokens start there
        if kv_cache is not None:
            T = check_decoding(kv_cache, self.spec, self_attn, key_padding_mask, is_causal, B)
            is_causal = True
        causal = self.is_causal if is_causal is None else is_causal
        Nk = self._check_call(query, key, value, self_attn, T, causal, attn_mask,
                              key_padding_mask, isinstance(kv_cache, StateCache))
        at = T if positions is None else check_layer_positions(
            positions, self.positions, self_attn, kv_cache is not None, Nq, _W)
        # Before anything is appended to a cache: a bad mask must leave it untouched.
        if isinstance(kv_cache, StateCache):
            check_state_call(self.spec, attn_mask, need_weights, self.positions, _W)
            mask, mech_causal = None, True
        else:
            mask, mech_causal = self._mask(attn_mask, key_padding_mask, Nq, Nk, causal, query,
                                           T, kv_cache is not None)
        xq, tail = query, None  # the gate reads the layer's own input, not the convolved
        if self.conv is not None:
            xq, key, value, tail = self.conv.apply(query, key, value, causal=causal,
                                                   key_padding_mask=key_padding_mask,
                                                   self_attn=self_attn, cache=kv_cache, T=T,
                                                   who=_W)
        q = self._split(self.q_proj(xq), self.num_heads)
        res = self._run(q, key, value, mask, mech_causal, at, kv_cache, key_padding_mask,
                        need_weights)
        out, weights = res if need_weights else (res, None)
        if tail is not None:  # the call succeeded: the cache moves on with the keys
            kv_cache.conv_tail = tail
        if self.gate is not None:
            out = self.gate(out, query)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Nq, self.embed_dim))
        out = out if self.batch_first else out.transpose(0, 1)
        return (out, weights) if need_weights else out
