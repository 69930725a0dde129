r"""Hybrid heads: one multi-head layer whose heads run different mechanisms.

Child et al. 2019 (Sparse Transformers, "Factorized attention heads") give three ways to
put several attention patterns ``A`` into a network: one pattern per residual block (here
:mod:`attnlab.models.blocks`' ``layer_mechanisms``), a merged pattern, or multi-head
attention whose ``n_h`` heads compute their products in parallel, each with *its own*
pattern, concatenated along the features:

.. math:: \mathrm{attention}(X) = W_p \cdot \big(\mathrm{attend}(X, A^{(i)})\big)_{i \in
    \{1, \dots, n_h\}}

This mechanism is that last form with any registered mechanism in place of a pattern:
heads ``[0, c_1)`` run the first part's mechanism, ``[c_1, c_1 + c_2)`` the second's, and
so on; the layer's ``W_p`` (the output projection) mixes them. (Why this citation: it
writes the per-head assignment down as an equation. Longformer, Beltagy et al. 2020,
mixes local and global attention *within* each head, not across heads; ConvBERT, Jiang et
al. 2020, concatenates self-attention heads with convolution heads and Hymba, Dong et
al. 2024, attention heads with SSM heads: the same construction with other parts.)

``heads`` spells the parts (no ``eval``; values typed by the part's own hyperparameters)::

    heads  := part ("+" part)*
    part   := name ["(" key "=" value ("," key "=" value)* ")"] ["*" count]

e.g. ``"sliding_window(window=64)*4+sdpa*4"``. ``count`` heads run ``name``; one part may
leave its count out and takes the heads the others leave (``"local"`` alone: every head).
``heads=None`` (the default) is every head ``sdpa``: exact softmax attention. Each part
is built with :func:`attnlab.create_for` for its own head count; ``head_dim`` and
``max_seq_len`` reach it from the layer, never from the string.

Flags: an instance's ``spec`` holds the AND of its parts' flags (``causal`` only if every
part has a causal form, ``exact`` only if every part is exact, ...; ``learnable`` if any
part is), so the layer and the contract check refuse what one part cannot do. The
registry's flags are those of the default, every head ``sdpa``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnlab.mechanisms.base import Mechanism
from attnlab.registry import (
    CONTEXT_HPARAMS,
    REQUIRED,
    HParam,
    Limit,
    MechanismSpec,
    Paper,
    create_for,
    get,
    register_mechanism,
    resolve_name,
)
from attnlab.util.checks import did_you_mean

__all__ = ["HybridAttention", "Part", "head_counts", "parse_heads"]

CHILD_2019 = Paper("Generating Long Sequences with Sparse Transformers",
                   "Rewon Child, Scott Gray, Alec Radford, Ilya Sutskever", 2019,
                   "https://arxiv.org/abs/1904.10509")

_SYNTAX = "name[(key=value, ...)][*count] joined by '+', e.g. 'sliding_window(window=64)*4+sdpa*4'"
_PART = re.compile(r"(?P<name>[A-Za-z_][\w\-]*)\s*(?:\((?P<args>[^()]*)\))?\s*"
                   r"(?:\*\s*(?P<count>[^*]*))?")
_INT = re.compile(r"[+-]?\d+")
# The flags every part must have for the whole to have them.
_AND_FLAGS = ("exact", "causal", "arbitrary_mask", "cross", "returns_weights",
              "differentiable", "half_precision", "kv_cache")


@dataclass(frozen=True)
class Part:
    """One ``name(key=value, ...)*count`` of a ``heads`` string; ``count`` ``None``: the
    heads the other parts leave."""

    name: str  # canonical
    count: int | None
    hparams: dict[str, Any]
    text: str  # as written, for errors


def _split(text: str, sep: str, where: str) -> list[str]:
    """``text`` split at ``sep`` outside parentheses; unbalanced ones are an error."""
    pieces, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth < 0 or depth > 1:
            raise ValueError(f"{where}: unbalanced or nested parentheses in {text!r}; "
                             f"expected {_SYNTAX}")
        if ch == sep and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"{where}: unclosed '(' in {text!r}; expected {_SYNTAX}")
    return [*pieces, text[start:]]


def _typed(h: HParam, raw: str, where: str):
    """The text ``raw`` as a value of ``h``'s type (range checks are ``h.validate``'s)."""
    bad = f"{where}: hyperparameter {h.name!r} must be {h.type.__name__}"
    if raw.lower() in ("none", "null"):
        return None  # h.validate refuses it unless h is nullable
    if h.type is bool:
        if raw.lower() not in ("true", "false"):
            raise ValueError(f"{bad} (true or false); got {raw!r}")
        return raw.lower() == "true"
    if h.type is int:
        if not _INT.fullmatch(raw):
            raise ValueError(f"{bad}; got {raw!r}")
        return int(raw)
    if h.type is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{bad}; got {raw!r}") from None
    if h.type is str:
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        return raw[1:-1] if quoted else raw
    raise TypeError(f"{where}: hyperparameter {h.name!r} is a {h.type.__name__}, which a "
                    f"heads string cannot spell; build that mechanism on its own")


def _hparams(spec: MechanismSpec, args: str | None, where: str) -> dict[str, Any]:
    if args is None or not args.strip():
        return {}
    known = {h.name: h for h in spec.hparams if h.name not in CONTEXT_HPARAMS}
    out: dict[str, Any] = {}
    for item in args.split(","):
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise ValueError(f"{where}: expected key=value inside the parentheses; "
                             f"got {item.strip()!r}")
        if key in CONTEXT_HPARAMS:
            raise ValueError(f"{where}: {key} comes from the layer; leave it out")
        if key not in known:
            hint = did_you_mean(key, known, n=3, cutoff=0.6, style="paren")
            raise TypeError(f"{where}: {spec.name} has no hyperparameter {key!r}{hint}; "
                            f"accepted: {', '.join(known) or 'none'}")
        if key in out:
            raise ValueError(f"{where}: {key} is given twice")
        out[key] = _typed(known[key], raw, where)
    return out


def parse_heads(text: str) -> list[Part]:
    """The parts of a ``heads`` string, names resolved (close-match hints on a typo) and
    values typed; ``ValueError``/``TypeError`` naming the part otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"hybrid: heads must be a str ({_SYNTAX}); got "
                        f"{type(text).__name__} {text!r}")
    parts = []
    for i, piece in enumerate(_split(text, "+", f"hybrid: heads {text!r}"), 1):
        where = f"hybrid: heads part {i} {piece.strip()!r}"
        m = _PART.fullmatch(piece.strip())
        if m is None:
            what = "is empty" if not piece.strip() else f"{piece.strip()!r} is malformed"
            raise ValueError(f"hybrid: heads part {i} of {text!r} {what}; expected {_SYNTAX}")
        try:
            name = resolve_name(m["name"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        spec = get(name)
        if spec.inputs != "qkv" or name == "hybrid":
            raise ValueError(f"{where}: a part must be a (q, k, v) mechanism other than "
                             f"hybrid itself; {name!r} is not")
        count = m["count"]
        if count is not None:
            if not re.fullmatch(r"\d+", count.strip()) or int(count) < 1:
                raise ValueError(f"{where}: the count after '*' must be an int >= 1; "
                                 f"got {count.strip()!r}")
            count = int(count)
        parts.append(Part(name, count, _hparams(spec, m["args"], where), piece.strip()))
    return parts


def head_counts(parts: list[Part], num_heads: int, text: str) -> list[int]:
    """Each part's head count: as written, the one without a count taking the rest; they
    must sum to ``num_heads``."""
    free = [p.text for p in parts if p.count is None]
    given = sum(p.count for p in parts if p.count is not None)
    where = f"hybrid: heads {text!r}"
    if len(free) > 1:
        raise ValueError(f"{where}: only one part may leave out its count (it takes the "
                         f"remaining heads); {free} do")
    if free and num_heads - given < 1:
        raise ValueError(f"{where}: the counts given sum to {given}, leaving no head for "
                         f"{free[0]!r} of num_heads={num_heads}")
    if not free and given != num_heads:
        raise ValueError(f"{where}: the counts sum to {given}, but num_heads={num_heads}")
    return [num_heads - given if p.count is None else p.count for p in parts]


def _instance_spec(base: MechanismSpec, parts: list[MechanismSpec]) -> MechanismSpec:
    """``base`` with the AND of the parts' flags (``learnable``: the OR) and their costs."""
    flags = {f: all(getattr(p, f) for p in parts) for f in _AND_FLAGS}
    return dataclasses.replace(
        base, **flags, learnable=any(p.learnable for p in parts),
        declared_key_padding=all(p.key_padding for p in parts),
        time=f"O(sum of its parts'): {'; '.join(f'{p.name} {p.time}' for p in parts)}",
        memory=f"O(max of its parts'): {'; '.join(f'{p.name} {p.memory}' for p in parts)}")


@register_mechanism(
    "hybrid", family="hybrid", paper=CHILD_2019,
    time="O(sum of its parts'), up to O(N^2 D) with a dense part",
    memory="O(max of its parts'), up to O(N^2) with a quadratic part",
    equation="attention(X) = W_p (attend(X, A^(i)))_{i=1..n_h}: head i runs the mechanism "
             "of the part it falls in, heads split in order along dim 1",
    # The default (heads=None: every head sdpa); an instance's spec has its parts' AND.
    exact=True, causal=True, arbitrary_mask=True, cross=True, returns_weights=True,
    kv_cache=True,
    hparams=[
        HParam("heads", str, None, "the parts, 'name(key=value)*count' joined by '+' "
               "(None: every head sdpa)", nullable=True),
        HParam("num_heads", int, REQUIRED, "heads H; the counts sum to it", low=1),
        HParam("head_dim", int, None, "size D of each head, for the parts that need it",
               low=1, nullable=True),
        HParam("max_seq_len", int, None, "longest N, for the parts that need it", low=1,
               nullable=True),
    ],
    limit=Limit(hparams=lambda n: {"heads": None},
                note="heads=None: every head sdpa, exact softmax attention"),
    summary="Heads of different mechanisms in one layer (e.g. local*4+sdpa*4).",
)
class HybridAttention(Mechanism):
    """Heads of different mechanisms in one layer (e.g. local*4+sdpa*4).

    ``parts`` holds one sub-mechanism per part, ``counts`` their head counts, in order.
    With ``scale=None`` each part uses its own default scale (Luong's ``dot`` is unscaled,
    most others ``1/sqrt(D)``): :meth:`default_scale` is their common one, or ``None``.
    """

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        text = "sdpa" if self.hp["heads"] is None else self.hp["heads"]
        parts = parse_heads(text)
        self.counts = tuple(head_counts(parts, self.hp["num_heads"], text))
        self.parts = nn.ModuleList(self._build(i, p, c)
                                   for i, (p, c) in enumerate(zip(parts, self.counts,
                                                                  strict=True), 1))
        self.spec = _instance_spec(type(self).spec, [m.spec for m in self.parts])

    def _build(self, i: int, part: Part, count: int) -> Mechanism:
        try:
            return create_for(part.name, head_dim=self.hp["head_dim"], num_heads=count,
                              max_seq_len=self.hp["max_seq_len"], **part.hparams)
        except (TypeError, ValueError) as e:
            raise type(e)(f"hybrid: heads part {i} {part.text!r}: {e}") from None

    def default_scale(self, d: int) -> float | None:
        scales = {m.default_scale(d) for m in self.parts}
        # None reaches _attend as is and each part then takes its own default.
        return scales.pop() if len(scales) == 1 else None

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        H = q.shape[1]
        if H != sum(self.counts):
            raise ValueError(f"hybrid: q has {H} heads, but this module was built for "
                             f"num_heads={sum(self.counts)} (heads {self.hp['heads']!r})")
        outs, weights, h0 = [], [], 0
        for part, n in zip(self.parts, self.counts, strict=True):
            s = slice(h0, h0 + n)
            h0 += n
            m = attn_mask if attn_mask is None or attn_mask.shape[1] == 1 else attn_mask[:, s]
            res = part(q[:, s], k[:, s], v[:, s], attn_mask=m, is_causal=is_causal,
                       scale=scale, dropout_p=dropout_p, need_weights=need_weights)
            out, w = res if need_weights else (res, None)
            outs.append(out)
            weights.append(w)
        if len(outs) == 1:  # one part: its result itself, no concatenation copy
            return outs[0], weights[0]
        return torch.cat(outs, dim=1), (torch.cat(weights, dim=1) if need_weights else None)
