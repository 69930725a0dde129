"""The arguments every transformer model of :mod:`attnlab.models` shares, checked once:
the mechanism and its hyperparameters, one mechanism per layer, positions, key padding.

Each check names the model, the argument, what it expected and what it got; the models
call :func:`transformer_args` in their constructors and save its normalised result as
their config (rebuilt with ``cls(**config)``).
"""

from __future__ import annotations

import inspect
import json
import re

import torch

from attnlab.nn import MultiheadAttention
from attnlab.nn.options import hybrid_sugar
from attnlab.registry import create_for, get, list_mechanisms
from attnlab.util.checks import check_choice, check_float, check_int

__all__ = ["POSITIONS", "as_layer_mechanism", "attn_positions", "check_layer_mechanisms",
           "check_mechanism", "key_padding_capable", "padding_for", "transformer_args"]

POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "none")
# MultiheadAttention's own keywords: a mechanism hyperparameter of the same name would be
# swallowed by the layer instead of reaching the mechanism, so the models refuse it.
_MHA_ARGS = frozenset(inspect.signature(MultiheadAttention.__init__).parameters) - {"self",
                                                                                    "hparams"}


def check_mechanism(who: str, name: str, mechanism, kwargs, **need: bool):
    """``(canonical name, kwargs dict)``; ``need`` flags (``causal=True``, ``cross=True``)
    the mechanism must have, refused with the list of those that do. ``"hybrid:<heads>"``
    is ``("hybrid", {..., "heads": <heads>})``."""
    mechanism, kwargs = hybrid_sugar(mechanism, {} if kwargs is None else kwargs, f"{who}: ")
    spec = get(mechanism)  # unknown name -> ValueError with close matches
    for flag, wanted in need.items():
        if wanted and not getattr(spec, flag):
            raise ValueError(f"{who}: {name}={mechanism!r} has no {flag} form (registry flag "
                             f"{flag}=False); choose one of {list_mechanisms(**{flag: True})}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"{who}: {name}_kwargs must be a dict of hyperparameters with str "
                        f"keys or None; got {type(kwargs).__name__} {kwargs!r}")
    clash = sorted(set(kwargs) & _MHA_ARGS)
    if clash:
        raise ValueError(f"{who}: {name}_kwargs may not set {clash}: the model sets them "
                         f"(they are MultiheadAttention arguments, not mechanism hyperparameters)")
    try:  # the config is saved as JSON and rebuilt with cls(**config)
        json.dumps(kwargs)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{who}: {name}_kwargs must be JSON-serialisable (the model's config "
                        f"is saved as JSON); got {kwargs!r}: {e}") from None
    return spec.name, dict(kwargs)


def _split_layers(who: str, value) -> list[str]:
    """A list of strings, or one of them joined by commas (``"local,sdpa"``, as
    ``--model-opt`` gives it), split outside parentheses (``"local(a=1, b=2)"``)."""
    if isinstance(value, str):
        value = re.split(r",(?![^()]*\))", value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{who}: layer_mechanisms must be a list of mechanism names (or one "
                        f"comma-separated string of them) or None; got {value!r}")
    return [v.strip() for v in value]


def as_layer_mechanism(item: str) -> str:
    """A layer's mechanism string, a hybrid's bare heads (``"local*2+sdpa*2"``) prefixed."""
    return f"hybrid:{item}" if ":" not in item and any(c in item for c in "*+(") else item


def check_layer_mechanisms(who: str, layer_mechanisms, *, num_layers: int, d_model: int,
                           num_heads: int, max_len: int, causal: bool) -> list[str] | None:
    """One mechanism per layer (Child et al. 2019's attention type per residual block):
    canonical names, or ``"hybrid:<heads>"`` for an item with a ``:`` or that reads as a
    hybrid's heads (``"local*2+sdpa*2"``, ``"local(block_size=8)"``), each with a causal
    form (a hybrid's in every part) when ``causal``. ``None`` stays ``None``."""
    if layer_mechanisms is None:
        return None
    items = _split_layers(who, layer_mechanisms)
    if len(items) != num_layers:
        raise ValueError(f"{who}: layer_mechanisms must give one mechanism per layer "
                         f"(num_layers={num_layers}); got {len(items)}: {items}")
    out = []
    for i, item in enumerate(items):
        where, item = f"{who}: layer_mechanisms[{i}]", as_layer_mechanism(item)
        try:
            name, kw = hybrid_sugar(item, {}, "")
            spec = get(name)  # unknown name -> ValueError with close matches
            if kw:  # built once, off the record, to check the string and its parts' flags
                with torch.random.fork_rng(devices=[]):
                    spec = create_for(name, head_dim=d_model // num_heads, num_heads=num_heads,
                                      max_seq_len=max_len, **kw).spec
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None
        if causal and not spec.causal:
            raise ValueError(f"{where}: {item!r} has no causal form (a hybrid needs one in "
                             f"every part); choose among {list_mechanisms(causal=True)}")
        out.append(f"hybrid:{kw['heads']}" if kw else spec.name)
    return out


def key_padding_capable(spec) -> bool:
    """Whether ``MultiheadAttention`` can give the mechanism a key-padding mask."""
    return bool(spec.arbitrary_mask or spec.key_padding)


def padding_for(spec, mask: torch.Tensor | None, causal: bool) -> torch.Tensor | None:
    """The key-padding mask to hand ``MultiheadAttention`` for mechanism ``spec``.

    Passed as is when the mechanism can take it. Otherwise it is dropped where that is
    exact for every real token: no padding at all, or causal attention with padding only
    at the end of each row (a real query ``i`` only sees keys ``j <= i``, all real).
    Anything else cannot be masked and is refused rather than silently leaking the pads.
    """
    if mask is None or key_padding_capable(spec):
        return mask
    if not bool(mask.any()):
        return None
    if causal and _right_padded(mask):
        return None
    able = [n for n in list_mechanisms() if key_padding_capable(get(n))]
    raise ValueError(f"mechanism {spec.name!r} cannot mask padded keys (registry flags "
                     f"arbitrary_mask=False, no key_padding); use a batch without padding or "
                     f"one of {able}")


def _right_padded(mask: torch.Tensor) -> bool:
    """``True`` when every row is real tokens followed only by padding."""
    # Once a row turns to padding it stays padding: the running max equals the mask.
    return bool((mask.int().cummax(dim=1).values == mask.int()).all())


def transformer_args(who: str, *, mechanism, mechanism_kwargs, d_model, num_heads,
                     num_layers, d_ff, dropout, max_len, positions, pad_id, causal: bool,
                     vocab: dict[str, int], layer_mechanisms=None) -> dict:
    """Validate the arguments every transformer model shares; returns them normalised
    (the mechanism by its canonical name), in the order of the constructors;
    ``layer_mechanisms`` only when given (configs saved without it rebuild as before)."""
    for name, v in vocab.items():
        check_int(name, v, low=1, who=who)
    mechanism, mechanism_kwargs = check_mechanism(who, "mechanism", mechanism,
                                                  mechanism_kwargs, causal=causal)
    check_int("d_model", d_model, who=who)
    check_int("num_heads", num_heads, who=who)
    if d_model % num_heads:
        raise ValueError(f"{who}: d_model must be divisible by num_heads; got d_model="
                         f"{d_model}, num_heads={num_heads}")
    check_int("num_layers", num_layers, who=who)
    check_int("d_ff", d_ff, nullable=True, who=who)
    dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False, who=who)
    check_int("max_len", max_len, who=who)
    check_choice("positions", positions, POSITIONS, who=who)
    check_int("pad_id", pad_id, low=0, who=who)
    for name, v in vocab.items():
        if pad_id >= v:
            raise ValueError(f"{who}: pad_id must be < {name}={v}; got pad_id={pad_id}")
    if mechanism == "hybrid":  # its flags are its parts': checked as a layer's would be
        check_layer_mechanisms(who, [f"hybrid:{mechanism_kwargs.get('heads') or 'sdpa'}"],
                               num_layers=1, d_model=d_model, num_heads=num_heads,
                               max_len=max_len, causal=causal)
    layers = check_layer_mechanisms(who, layer_mechanisms, num_layers=num_layers,
                                    d_model=d_model, num_heads=num_heads, max_len=max_len,
                                    causal=causal)
    return dict(mechanism=mechanism, mechanism_kwargs=mechanism_kwargs, d_model=d_model,
                num_heads=num_heads, num_layers=num_layers, d_ff=d_ff, dropout=dropout,
                max_len=max_len, positions=positions, pad_id=pad_id,
                **({} if layers is None else {"layer_mechanisms": layers}))


def attn_positions(positions: str) -> str | None:
    """The part of ``positions`` that ``MultiheadAttention`` applies."""
    return positions if positions in ("rope", "alibi") else None
