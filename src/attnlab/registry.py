"""The mechanism registry, in the style of timm's ``register_model``.

A mechanism registers itself where it is defined::

    @register_mechanism(
        "reference", family="exact", paper=VASWANI_2017,
        time="O(N^2 D)", memory="O(N^2)", exact=True, ...,
        hparams=[HParam("block_size", int, 128, "keys per tile", low=1)],
    )
    class ReferenceAttention(Mechanism): ...

Nothing keeps a second list by hand: ``list_mechanisms()`` reads what was registered.
Hyperparameters are typed and validated here, once, so every mechanism reports bad
values the same way (a ``ValueError``/``TypeError`` naming the argument, what was
expected and what was given).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from attnlab.flops import resolve_flop_model
from attnlab.util.checks import did_you_mean

__all__ = [
    "HParam",
    "Limit",
    "MechanismSpec",
    "Paper",
    "REQUIRED",
    "CONTEXT_HPARAMS",
    "INPUTS",
    "create",
    "create_for",
    "get",
    "list_mechanisms",
    "register_mechanism",
    "resolve_name",
]


class _Required:
    """Sentinel default for a hyperparameter the caller must give (e.g. ``head_dim``)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Paper:
    title: str
    authors: str
    year: int
    url: str = ""

    def short(self) -> str:
        first = self.authors.split(",")[0].split(" and ")[0].strip().split(" ")[-1]
        etal = " et al." if ("," in self.authors or " and " in self.authors) else ""
        return f"{first}{etal} {self.year}"


@dataclass(frozen=True)
class HParam:
    """A typed hyperparameter with its default and its valid range.

    ``low``/``high`` are inclusive bounds; ``low_exclusive`` makes ``low`` strict.
    ``choices`` restricts to a set of values. ``nullable`` allows ``None``.
    ``multiple_of`` makes an int a multiple of it (a head split into halves: 2).
    """

    name: str
    type: type
    default: Any
    doc: str = ""
    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    multiple_of: int | None = None

    def validate(self, value: Any, mechanism: str) -> Any:
        where = f"{mechanism}: hyperparameter {self.name!r}"
        if value is None:
            if self.nullable:
                return None
            raise ValueError(f"{where} must be given (expected {self._expected()}); got None")
        if isinstance(value, _Required):
            raise ValueError(f"{where} is required (expected {self._expected()}); it was not given")
        value = self._coerce(value, where)
        if self.choices is not None and value not in self.choices:
            hint = did_you_mean(value, self.choices, n=3, cutoff=0.6)
            raise ValueError(f"{where} must be one of {list(self.choices)}; got {value!r}{hint}")
        if self.type in (int, float):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{where} must be finite; got {value!r}")
            if self.low is not None and (
                value < self.low or (self.low_exclusive and value == self.low)
            ):
                raise ValueError(f"{where} must be {self._range()}; got {value!r}")
            if self.high is not None and value > self.high:
                raise ValueError(f"{where} must be {self._range()}; got {value!r}")
        if self.multiple_of is not None and value % self.multiple_of:
            raise ValueError(f"{where} must be a multiple of {self.multiple_of}"
                             f"{f' ({self.doc})' if self.doc else ''}; got {value!r}")
        return value

    def _coerce(self, value: Any, where: str) -> Any:
        # bool is an int subclass: never accept True as "1 head".
        if self.type is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{where} must be a bool; got {type(value).__name__} {value!r}")
            return value
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{where} must be an int; got {type(value).__name__} {value!r}")
            return value
        if self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{where} must be a float; got {type(value).__name__} {value!r}")
            return float(value)
        if not isinstance(value, self.type):
            raise TypeError(
                f"{where} must be {self.type.__name__}; got {type(value).__name__} {value!r}"
            )
        return value

    def _range(self) -> str:
        lo = ""
        if self.low is not None:
            lo = f"> {self.low}" if self.low_exclusive else f">= {self.low}"
        hi = "" if self.high is None else f"<= {self.high}"
        return " and ".join(p for p in (lo, hi) if p) or "any value"

    def _expected(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        rng = self._range() if self.type in (int, float) else ""
        mult = f", a multiple of {self.multiple_of}" if self.multiple_of else ""
        return f"{self.type.__name__}" + (f" {rng}" if rng and rng != "any value" else "") + mult

    def describe_default(self) -> str:
        return "required" if isinstance(self.default, _Required) else repr(self.default)


@dataclass(frozen=True)
class Limit:
    """How the correctness gate checks a mechanism: under ``hparams(n)`` (which override
    the user's), on length-``n`` inputs, the mechanism computes ``reference`` exactly.

    :func:`attnlab.verify.verify` builds the mechanism with ``hparams(n)``, draws seeded
    ``q, k, v`` and compares the output with ``reference`` computed in float64.
    """

    hparams: Callable[[int], dict]  # n -> hyperparameter overrides that make it exact
    note: str  # one line for people, e.g. "window >= N: full attention"
    # None: exact softmax attention, softmax(q k^T / sqrt(D)) V. Else a dense float64
    # formula f(q, k, v, *, mech, scale, is_causal) -> out; ``scale`` is the one the
    # mechanism was called with (None: the formula's own default, known from its paper).
    reference: Callable | None = None
    tol: float = 1e-4  # relative error allowed in float32 (scaled for other dtypes)
    # ``inputs(q, k, v, generator)`` reshapes the drawn standard-normal float64 inputs
    # where the check needs it (Performer: where the estimator's variance is small; dot:
    # unit-variance unscaled scores). ``statistical=True`` says ``tol`` bounds a Monte Carlo
    # error, which does not shrink with the dtype (float64 keeps ``tol``).
    inputs: Callable | None = None
    statistical: bool = False
    # For a mechanism outside the (q, k, v) contract (``inputs`` "graph" or "pair"), the
    # whole check: ``gate(spec, *, n, head_dim, num_heads, batch, dtype, causal, device,
    # seed, hparams) -> (out, ref)``, ``ref`` in float64; verify judges them as usual.
    gate: Callable | None = None


@dataclass(frozen=True)
class MechanismSpec:
    """Everything the registry knows about one mechanism."""

    name: str
    cls: type
    family: str
    paper: Paper
    time: str
    memory: str
    equation: str
    exact: bool
    causal: bool
    arbitrary_mask: bool
    cross: bool
    returns_weights: bool
    differentiable: bool = True
    half_precision: bool = True
    learnable: bool = False
    aliases: tuple[str, ...] = ()
    hparams: tuple[HParam, ...] = ()
    summary: str = ""
    # Hyperparameters that make the mechanism valid on tiny inputs (16 tokens, D=4):
    # used by the generic contract tests and nothing else; defaults stay realistic.
    tiny_hparams: dict = field(default_factory=dict)
    # The limit case the correctness gate (attnlab.verify) checks it in.
    limit: Limit | None = None
    # Decoding with attnlab.nn.KVCache equals the full causal forward: one query attending
    # every cached key is its own causal row (softmax over scores of q_i and k_j alone).
    kv_cache: bool = False
    # Decoding with its own bounded state (attnlab.nn.StateCache, Mechanism.decode) equals
    # the full causal forward: a recurrent state (S = sum phi(k) v^T) or a rolling window.
    decode_state: bool = False
    # register_mechanism(key_padding=...) as given (None: as arbitrary_mask). ``key_padding``
    # is derived from it, not stored, so that dataclasses.replace(spec, arbitrary_mask=False)
    # does not keep a True that only followed from arbitrary_mask.
    declared_key_padding: bool | None = None
    # The work it needs, analytically: f(*, B, H, Nq, Nk, D, Dv, causal, pass_, hparams)
    # -> FLOPs (attnlab.flops). None: the benchmark lab counts with FlopCounterMode.
    flops: Callable[..., float] | None = None
    # What forward takes (:data:`INPUTS`): the (q, k, v) contract, or a graph's or a pair
    # of sequences'; only "qkv" mechanisms are benchmarked and trained by name.
    inputs: str = "qkv"
    # Takes a bool key-padding attn_mask (B, H, 1, Nk) (True = may attend), arbitrary or not.
    key_padding: bool = field(init=False)

    def __post_init__(self) -> None:
        kp = self.declared_key_padding
        object.__setattr__(self, "key_padding", self.arbitrary_mask if kp is None else bool(kp))

    def hparam(self, name: str) -> HParam:
        for h in self.hparams:
            if h.name == name:
                return h
        raise KeyError(name)

    def validate_hparams(self, given: dict[str, Any]) -> dict[str, Any]:
        return validate_hparams(self.name, self.hparams, given)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "family": self.family,
            "exact": self.exact,
            "time": self.time,
            "memory": self.memory,
            "causal": self.causal,
            "arbitrary_mask": self.arbitrary_mask,
            "key_padding": self.key_padding,
            "kv_cache": self.kv_cache,
            "decode_state": self.decode_state,
            "cross": self.cross,
            "returns_weights": self.returns_weights,
            "differentiable": self.differentiable,
            "half_precision": self.half_precision,
            "learnable": self.learnable,
            "inputs": self.inputs,
            "equation": self.equation,
            "summary": self.summary,
            "limit": self.limit.note if self.limit else None,
            "paper": {
                "title": self.paper.title,
                "authors": self.paper.authors,
                "year": self.paper.year,
                "url": self.paper.url,
            },
            "hparams": [
                {
                    "name": h.name,
                    "type": h.type.__name__,
                    "default": None if isinstance(h.default, _Required) else h.default,
                    "required": isinstance(h.default, _Required),
                    "doc": h.doc,
                }
                for h in self.hparams
            ],
        }


def validate_hparams(owner: str, hparams: Sequence[HParam],
                     given: dict[str, Any]) -> dict[str, Any]:
    """Every hyperparameter of ``owner``: ``given`` validated over the defaults. Unknown
    names raise ``TypeError`` with close matches; bad values ``TypeError``/``ValueError``."""
    known = {h.name: h for h in hparams}
    unknown = [k for k in given if k not in known]
    if unknown:
        msgs = []
        for k in unknown:
            msgs.append(f"{k!r}{did_you_mean(k, known, n=3, cutoff=0.6, style='paren')}")
        accepted = ", ".join(known) or "none"
        raise TypeError(f"{owner}: unknown hyperparameter {', '.join(msgs)}; accepted: {accepted}")
    return {h.name: h.validate(given.get(h.name, h.default), owner) for h in hparams}


# What a mechanism's forward takes:
#   "qkv"   the functional contract, forward(q, k, v, *, attn_mask, is_causal, scale, ...)
#           with (B, H, N, D) tensors (attnlab.contract);
#   "graph" forward(q, k, v, *, edge_index) with node features (B, H, N, D) and a graph's
#           edges, a (2, E) int64 tensor of (source j, target i): node i attends its in-edges;
#   "pair"  forward(a, b) over two sequences (B, Na, D) and (B, Nb, D) of different lengths,
#           returning one attended summary of each.
INPUTS = ("qkv", "graph", "pair")

_REGISTRY: dict[str, MechanismSpec] = {}
_ALIASES: dict[str, str] = {}


def _check_registration(name, *, causal, cross, arbitrary_mask, kv_cache, key_padding,
                        limit, inputs, decode_state=False) -> None:
    """The flags of one registration agree with each other (a ValueError/TypeError if not)."""
    if decode_state and not causal:
        raise ValueError(f"register_mechanism({name!r}): decode_state=True needs causal=True "
                         f"(decoding continues a causal sequence); got causal={causal}")
    if decode_state and kv_cache:
        raise ValueError(f"register_mechanism({name!r}): decode_state=True and kv_cache=True "
                         f"are two ways to decode; a mechanism has one (kv_cache: every key "
                         f"kept; decode_state: its own bounded state)")
    if kv_cache and not (causal and cross):
        raise ValueError(f"register_mechanism({name!r}): kv_cache=True needs causal=True and "
                         f"cross=True (new queries attend cached keys, Nq != Nk); got "
                         f"causal={causal}, cross={cross}")
    if arbitrary_mask and key_padding is False:
        raise ValueError(f"register_mechanism({name!r}): key_padding=False contradicts "
                         f"arbitrary_mask=True (a key-padding mask is one such mask); leave "
                         f"key_padding out")
    if limit is not None and not isinstance(limit, Limit):
        raise TypeError(f"register_mechanism({name!r}): limit must be a Limit or None; got "
                        f"{type(limit).__name__}")
    if inputs not in INPUTS:
        raise ValueError(f"register_mechanism({name!r}): inputs must be one of {INPUTS}; "
                         f"got {inputs!r}")
    if inputs != "qkv" and (limit is None or limit.gate is None):
        raise ValueError(f"register_mechanism({name!r}): inputs={inputs!r} is outside the "
                         f"(q, k, v) contract; give limit=Limit(..., gate=...) to check it")


def register_mechanism(
    name: str,
    *,
    family: str,
    paper: Paper,
    time: str,
    memory: str,
    equation: str,
    exact: bool,
    causal: bool,
    arbitrary_mask: bool,
    cross: bool,
    returns_weights: bool,
    differentiable: bool = True,
    half_precision: bool = True,
    learnable: bool = False,
    aliases: Sequence[str] = (),
    hparams: Sequence[HParam] = (),
    summary: str = "",
    tiny_hparams: dict | None = None,
    limit: Limit | None = None,
    kv_cache: bool = False,
    key_padding: bool | None = None,
    flops: str | Callable[..., float] | None = None,
    inputs: str = "qkv",
    decode_state: bool = False,
) -> Callable[[type], type]:
    """Class decorator: register a :class:`~attnlab.mechanisms.base.Mechanism` subclass.

    ``kv_cache``: incremental decoding with cached keys/values equals the full causal
    forward (needs ``causal`` and ``cross``). ``decode_state``: the class implements
    ``Mechanism._decode`` (a recurrent state or a rolling window) and decoding with it
    equals the full causal forward (needs ``causal``). ``key_padding``: takes a bool key-padding
    mask ``(B, H, 1, Nk)`` even without ``arbitrary_mask`` (``None``: same as
    ``arbitrary_mask``, which implies it). ``flops``: the work it needs, a model name from
    :data:`attnlab.flops.FLOP_MODELS` or a callable (see :mod:`attnlab.flops`).
    ``inputs``: what forward takes (:data:`INPUTS`); outside "qkv" the correctness gate is
    the limit's own ``gate``.
    """
    _check_registration(name, causal=causal, cross=cross, arbitrary_mask=arbitrary_mask,
                        kv_cache=kv_cache, key_padding=key_padding, limit=limit, inputs=inputs,
                        decode_state=decode_state)
    flop_model = resolve_flop_model(flops, name)

    def deco(cls: type) -> type:
        spec = MechanismSpec(
            name=name, cls=cls, family=family, paper=paper, time=time, memory=memory,
            equation=equation, exact=exact, causal=causal, arbitrary_mask=arbitrary_mask,
            cross=cross, returns_weights=returns_weights, differentiable=differentiable,
            half_precision=half_precision, learnable=learnable, aliases=tuple(aliases),
            hparams=tuple(hparams), summary=summary or (cls.__doc__ or "").strip().split("\n")[0],
            tiny_hparams=dict(tiny_hparams or {}), limit=limit, kv_cache=kv_cache,
            declared_key_padding=key_padding, flops=flop_model, inputs=inputs,
            decode_state=decode_state,
        )
        for key in (name, *aliases):
            if key in _REGISTRY or key in _ALIASES:
                raise ValueError(f"mechanism name {key!r} is already registered")
        _REGISTRY[name] = spec
        for a in aliases:
            _ALIASES[a] = name
        cls.spec = spec
        return cls

    return deco


def resolve_name(name: str) -> str:
    """Canonical name for ``name`` or an alias; ``ValueError`` with close matches if unknown."""
    if not isinstance(name, str):
        raise TypeError(f"mechanism must be a str name; got {type(name).__name__} {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key in _REGISTRY:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    known = sorted([*_REGISTRY, *_ALIASES])
    hint = did_you_mean(key, known, n=3)
    raise ValueError(
        f"mechanism: unknown name {name!r}{hint} (known: {', '.join(sorted(_REGISTRY))})"
    )


def get(name: str) -> MechanismSpec:
    """The :class:`MechanismSpec` registered under ``name`` (or one of its aliases)."""
    return _REGISTRY[resolve_name(name)]


def list_mechanisms(family: str | None = None, *, inputs: str | None = "qkv",
                    **flags: bool) -> list[str]:
    """Sorted names of registered mechanisms, optionally filtered.

    ``list_mechanisms(family="exact")``, ``list_mechanisms(causal=True, exact=False)``,
    ``list_mechanisms(kv_cache=True)``. By default only the mechanisms of the (q, k, v)
    contract, which every benchmark, model and contract test takes; ``inputs="graph"``
    (or ``"pair"``) those of graphs (pairs of sequences), ``inputs=None`` every one.
    """
    if inputs is not None and inputs not in INPUTS:
        raise ValueError(f"inputs: expected one of {INPUTS} or None; got {inputs!r}")
    valid = {"exact", "causal", "arbitrary_mask", "key_padding", "kv_cache", "decode_state",
             "cross", "returns_weights", "differentiable", "half_precision", "learnable"}
    bad = set(flags) - valid
    if bad:
        raise TypeError(f"list_mechanisms: unknown filter {sorted(bad)}; accepted: {sorted(valid)}")
    families = sorted({s.family for s in _REGISTRY.values()})
    if family is not None and family not in families:
        hint = did_you_mean(family, families, n=3)
        raise ValueError(f"family: unknown family {family!r}{hint} (known: "
                         f"{', '.join(families)})")
    out = []
    for n, s in _REGISTRY.items():
        if family is not None and s.family != family:
            continue
        if inputs is not None and s.inputs != inputs:
            continue
        if any(getattr(s, f) != v for f, v in flags.items()):
            continue
        out.append(n)
    return sorted(out)


def create(name: str, **hparams: Any):
    """Build the mechanism module ``name`` with validated hyperparameters."""
    spec = get(name)
    return spec.cls(**hparams)


# Hyperparameters that describe the model around a mechanism rather than the mechanism
# itself; modules (and the demo / benchmarks) fill them in when a mechanism declares them.
CONTEXT_HPARAMS = ("head_dim", "num_heads", "max_seq_len")


def create_for(name: str, *, head_dim: int, num_heads: int, max_seq_len: int | None = None,
               **hparams: Any):
    """Like :func:`create`, filling ``head_dim``/``num_heads``/``max_seq_len`` when the
    mechanism declares them and the caller did not give them."""
    spec = get(name)
    declared = {h.name for h in spec.hparams}
    context = {"head_dim": head_dim, "num_heads": num_heads, "max_seq_len": max_seq_len}
    for key, value in context.items():
        if key in declared and key not in hparams and value is not None:
            hparams[key] = value
    return spec.cls(**hparams)
