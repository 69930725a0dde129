"""Multi-head attention around any registered mechanism.

The layer owns what every mechanism needs and none implements: input/output
projections, the head split, grouped-query sharing of key/value heads, RoPE/ALiBi
positions, padding masks, a KV cache for decoding (:mod:`attnlab.nn.cache`) and dropout
in training mode. The score computation itself is whatever ``attnlab.create(mechanism,
...)`` builds, so a mechanism added to the registry plugs in without changes here.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as nnf
from torch import nn

from attnlab.contract import check_flag, format_shape
from attnlab.nn.cache import KVCache, check_decoding, decoding_mask
from attnlab.nn.positional import RotaryEmbedding, alibi_bias
from attnlab.registry import CONTEXT_HPARAMS, REQUIRED, create, get

__all__ = ["MultiheadAttention"]

POSITIONS = ("rope", "alibi")
_W = "MultiheadAttention: "  # every error names the layer


def _int(name: str, value, *, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    # bool is an int subclass: True must not silently mean "1 head".
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_W}{name} must be an int; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{_W}{name} must be >= 1; got {value!r}")
    return value


def _bool(name: str, value) -> bool:
    return check_flag(name, value, _W)


def _positions(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{_W}positions must be a str or None; got {type(value).__name__}")
    if value.lower() in POSITIONS:
        return value.lower()
    close = difflib.get_close_matches(value.lower(), POSITIONS, n=2, cutoff=0.4)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"{_W}positions must be one of {[*POSITIONS, None]}; got {value!r}{hint}")


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float form of a mask: bool ``True`` (may attend) -> 0, ``False`` -> ``-inf``."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~mask, float("-inf"))


def _combine(a: torch.Tensor | None, b: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """One contract mask allowing a pair only if both allow it (bool AND, float sum)."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _additive(a, dtype) + _additive(b, dtype)


def _mixed_linear(x: torch.Tensor, M: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """``M lin(x)`` as ``lin(M x)``: ``(k, n)`` mixing of ``x`` ``(B, n, d)`` along the length
    first; the bias, mixed too, becomes ``(M 1) b^T``."""
    M = M.to(x.dtype)
    out = nnf.linear(torch.matmul(M, x), lin.weight)
    return out if lin.bias is None else out + M.sum(-1, keepdim=True) * lin.bias


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
        mechanism: a registered name (``attnlab.list_mechanisms()``). Extra keyword
            arguments are its hyperparameters; ``head_dim``, ``num_heads`` and
            ``max_seq_len`` are filled in from the layer when the mechanism declares them.
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
        device=None,
        dtype=None,
        **hparams,
    ) -> None:
        super().__init__()
        E, H = _int("embed_dim", embed_dim), _int("num_heads", num_heads)
        if E % H:
            raise ValueError(f"{_W}embed_dim must be divisible by num_heads; got "
                             f"embed_dim={E}, num_heads={H} (remainder {E % H})")
        Hkv = H if num_kv_heads is None else _int("num_kv_heads", num_kv_heads)
        if H % Hkv:
            valid = [d for d in range(1, H + 1) if H % d == 0]
            raise ValueError(f"{_W}num_kv_heads must divide num_heads={H}; got "
                             f"num_kv_heads={Hkv} (valid: {valid})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"{_W}dropout must be a float; got {type(dropout).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{_W}dropout must be in [0, 1); got {dropout!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = E, H, Hkv
        self.head_dim = E // H
        self.kdim = E if kdim is None else _int("kdim", kdim)
        self.vdim = E if vdim is None else _int("vdim", vdim)
        self.max_seq_len = _int("max_seq_len", max_seq_len, nullable=True)
        self.dropout = float(dropout)
        self.is_causal = _bool("is_causal", is_causal)
        self.batch_first = _bool("batch_first", batch_first)
        self.positions = _positions(positions)

        self.spec = get(mechanism)  # unknown name -> ValueError with close matches
        cross = self.kdim != E or self.vdim != E
        self._check_spec(self.is_causal, {"positions='alibi'": self.positions == "alibi"},
                         f"kdim={self.kdim}, vdim={self.vdim} != embed_dim={E}" if cross else "")
        self.attn = create(self.spec.name, **self._mechanism_hparams(hparams))
        if device is not None or dtype is not None:
            self.attn.to(device=device, dtype=dtype)

        f = {"bias": _bool("bias", bias), "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(E, E, **f)
        self.k_proj = nn.Linear(self.kdim, Hkv * self.head_dim, **f)
        self.v_proj = nn.Linear(self.vdim, Hkv * self.head_dim, **f)
        self.out_proj = nn.Linear(E, E, **f)
        self.rotary = None
        if self.positions == "rope":
            if self.head_dim % 2:
                raise ValueError(f"{_W}positions='rope' needs an even head_dim = embed_dim // "
                                 f"num_heads; got head_dim={self.head_dim}")
            self.rotary = RotaryEmbedding(self.head_dim, rope_base)
            if self.max_seq_len is not None:  # build the tables once, up front
                self.rotary.tables(self.max_seq_len, device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation: Xavier inputs, zero biases.
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

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

    def extra_repr(self) -> str:
        extra = {"num_kv_heads": self.num_kv_heads, "positions": self.positions,
                 "is_causal": self.is_causal}
        defaults = {"num_kv_heads": self.num_heads, "positions": None, "is_causal": False}
        return ", ".join([f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}",
                          f"mechanism={self.spec.name!r}"]
                         + [f"{k}={v!r}" for k, v in extra.items() if v != defaults[k]])

    def _check_input(self, name: str, x, dim: int, batch: int | None, proj: nn.Linear) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{_W}{name} must be a torch.Tensor; got {type(x).__name__}")
        want = proj.weight.dtype
        if not x.is_floating_point():
            raise TypeError(f"{_W}{name} must be a floating-point tensor of the module's dtype "
                            f"{want}; got {x.dtype} (token ids go through an embedding first)")
        # Under autocast the projections run in the autocast dtype, whatever the input's.
        if x.dtype != want and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{_W}{name} dtype {x.dtype} does not match the module's dtype "
                            f"{want}; convert the input (.to({want})) or the module "
                            f"(.to({x.dtype}))")
        layout = "(B, N, E)" if self.batch_first else "(N, B, E)"
        if x.dim() != 3:
            raise ValueError(f"{_W}{name} must be 3-D {layout} with E={dim}; "
                             f"got {x.dim()}-D shape {format_shape(x)}")
        if x.shape[-1] != dim:
            raise ValueError(f"{_W}{name} feature size must be {dim}; got shape {format_shape(x)}")
        if batch is not None and x.shape[0] != batch:
            raise ValueError(f"{_W}{name} batch size {x.shape[0]} does not match the "
                             f"query's {batch} (shape {format_shape(x)})")

    def _mask(self, attn_mask, kpm, B: int, Nq: int, Nk: int, causal: bool, dtype, device,
              offset: int = 0):
        """attn_mask, key_padding_mask, ALiBi (query i at offset + i) as one mask (or None)."""
        full = (B, self.num_heads, Nq, Nk)
        mask = None
        for name, m in (("attn_mask", attn_mask), ("key_padding_mask", kpm)):
            if m is None:
                continue
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"{_W}{name} must be a torch.Tensor or None; "
                                f"got {type(m).__name__}")
            if m.dtype != torch.bool and not m.is_floating_point():
                what = "True = pad" if name == "key_padding_mask" else "True = may attend"
                raise TypeError(f"{_W}{name} must be bool ({what}) or float (additive); "
                                f"got dtype {m.dtype}")
        if attn_mask is not None:
            if not 1 <= attn_mask.dim() <= 4 or any(
                g not in (1, n)
                for g, n in zip(reversed(attn_mask.shape), reversed(full), strict=False)
            ):
                raise ValueError(f"{_W}attn_mask must be broadcastable to (B, H, Nq, Nk) = "
                                 f"{full}, e.g. (Nq, Nk); got {format_shape(attn_mask)}")
            mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
        if kpm is not None:
            if tuple(kpm.shape) != (B, Nk):
                raise ValueError(f"{_W}key_padding_mask must have shape (B, Nk) = ({B}, {Nk}); "
                                 f"got {format_shape(kpm)}")
            if kpm.dtype != torch.bool and not self.spec.arbitrary_mask:
                raise TypeError(f"{_W}mechanism {self.spec.name!r} takes only bool key "
                                f"padding (True = pad), not an additive float "
                                f"key_padding_mask; got dtype {kpm.dtype}")
            # torch's True = pad becomes the contract's True = may attend.
            pad = ~kpm if kpm.dtype == torch.bool else kpm.to(dtype)
            mask = _combine(mask, pad[:, None, None, :], dtype)
        if self.positions == "alibi":
            mask = _combine(mask, alibi_bias(self.num_heads, Nq, Nk, device, dtype, causal,
                                             offset=offset), dtype)
        return mask

    def _length_fold(self, n: int):
        """The mechanism's shared ``(E, F)`` length projections when mixing the inputs along
        the length before ``k_proj``/``v_proj`` is valid and cheaper, else ``None``.

        Valid when keys are not rotated by position (RoPE acts per position, after the
        projection). Cheaper when ``k kdim (n + D_kv) < n D_kv (kdim + k)``: mixing costs
        ``k n kdim`` and then projects only ``k`` rows (``D_kv = num_kv_heads * head_dim``).
        """
        projections = getattr(self.attn, "length_projections", None)
        if projections is None or self.rotary is not None:
            return None
        fold = projections(n)
        if fold is None:
            return None
        r, d_kv, d_in = fold[0].shape[0], self.num_kv_heads * self.head_dim, max(self.kdim,
                                                                                 self.vdim)
        return fold if r * d_in * (n + d_kv) < n * d_kv * (d_in + r) else None

    def _expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, N, D) -> (B, H, N, D)``: kv head ``j`` serves query heads ``j*g ..``."""
        g = self.num_heads // self.num_kv_heads
        if g == 1:
            return x
        B, Hkv, N, D = x.shape
        # expand is a view; the reshape copies once, as repeat_interleave(g, dim=1) would.
        return x[:, :, None].expand(B, Hkv, g, N, D).reshape(B, Hkv * g, N, D)

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
        kv_cache: KVCache | None = None,
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
        may add to the causal constraint, ``key_padding_mask`` may not be given.
        """
        if key is None and value is not None:
            raise ValueError(f"{_W}value was given without key")
        self_attn = key is None
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) if isinstance(t, torch.Tensor) and t.dim() == 3
                                 else t for t in (query, key, value))
        self._check_input("query", query, self.embed_dim, None, self.q_proj)
        B, Nq = query.shape[:2]
        if self_attn and (self.kdim, self.vdim) != (self.embed_dim,) * 2:
            raise ValueError(f"{_W}key=None (self-attention) needs kdim == vdim == embed_dim; "
                             f"this layer has kdim={self.kdim}, vdim={self.vdim}: pass key")
        # Flags first: a truthy non-bool must neither pass nor steer the checks below.
        if is_causal is not None:
            is_causal = _bool("is_causal", is_causal)
        need_weights = _bool("need_weights", need_weights)
        T = 0  # positions already cached: the new tokens start there
        if kv_cache is not None:
            T = check_decoding(kv_cache, self.spec, self_attn, key_padding_mask, is_causal, B)
            is_causal = True
        if not self_attn:
            self._check_input("key", key, self.kdim, B, self.k_proj)
            self._check_input("value", value, self.vdim, B, self.v_proj)
            if value.shape[1] != key.shape[1]:
                raise ValueError(f"{_W}key and value lengths differ: key {format_shape(key)}, "
                                 f"value {format_shape(value)}")
        Nk = T + key.shape[1]
        causal = self.is_causal if is_causal is None else is_causal
        if self.max_seq_len is not None and max(Nq, Nk) > self.max_seq_len:
            raise ValueError(f"{_W}sequence length {max(Nq, Nk)} exceeds "
                             f"max_seq_len={self.max_seq_len}")
        self._check_spec(causal, {"key_padding_mask": key_padding_mask is not None,
                                  "attn_mask": attn_mask is not None},
                         f"Nq={Nq} != Nk={Nk}" if Nq != Nk else "")
        # A mechanism that never forms its weights is asked for its *effective* weights.
        effective = need_weights and not self.spec.returns_weights

        def heads(x, h):  # (B, N, h*D) -> (B, h, N, D)
            return x.view(B, x.shape[1], h, self.head_dim).transpose(1, 2)

        # Before anything is appended to a cache: a bad mask must leave it untouched.
        mask = self._mask(attn_mask, key_padding_mask, B, Nq, Nk, causal, query.dtype,
                          query.device, T)
        if kv_cache is not None:  # ALiBi's causal bias (at offset T) is complete by itself
            alibi = self.positions == "alibi"
            allowed, causal = (None, False) if alibi else decoding_mask(T, Nq, query.device)
            mask = _combine(mask, allowed, query.dtype)
        q = heads(self.q_proj(query), self.num_heads)
        dropout_p = self.dropout if self.training else 0.0
        fold = None if kv_cache is not None else self._length_fold(Nk)
        if fold is not None:  # keys/values mixed along the length first: E (X W) = (E X) W
            E, F = fold
            if key_padding_mask is not None:  # bool here: padded columns mix in nothing
                keep = (~key_padding_mask).to(E.dtype)[:, None, :]          # (B, 1, Nk)
                E, F = E * keep, F * keep
            k = heads(_mixed_linear(key, E, self.k_proj), self.num_kv_heads)
            v = heads(_mixed_linear(value, F, self.v_proj), self.num_kv_heads)
            k, v = self._expand_kv(k), self._expand_kv(v)
            res = self.attn.attend_projected(q, k, v, dropout_p=dropout_p)
            if effective:  # the values' length mixing F, itself: A = P_bar F
                res = res, self.attn.attend_projected(q, k, F.expand(B, *F.shape[-2:])[:, None]
                                                      .expand(B, q.shape[1], *F.shape[-2:]))
        else:
            k = heads(self.k_proj(key), self.num_kv_heads)
            v = heads(self.v_proj(value), self.num_kv_heads)
            if self.rotary is not None:
                q, k = self.rotary(q, k, T)  # before the expansion: rotate Hkv heads, not H
            if kv_cache is not None:
                k, v = kv_cache.append(k, v)
            k, v = self._expand_kv(k), self._expand_kv(v)
            res = self.attn(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                            need_weights=need_weights and not effective)
            if effective:  # every mechanism here is linear in v: A = attend(q, k, I)
                eye = torch.eye(Nk, dtype=v.dtype, device=v.device).expand(*v.shape[:2], Nk, Nk)
                res = res, self.attn(q, k, eye, attn_mask=mask, is_causal=causal)
        out, weights = res if need_weights else (res, None)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Nq, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out, weights) if need_weights else out
