"""``attnlab.attention``: one entry point for every parameter-free mechanism.

``mechanism=None`` (or ``"auto"``) dispatches, in the manner of xFormers, to the
fastest *exact* implementation that is correct for the inputs:

* ``need_weights=True`` -> ``reference`` (the only exact path that forms the weights
  without recomputing them);
* otherwise -> ``sdpa`` (PyTorch's fused kernels; they fall back to the math kernel
  for inputs they cannot take, so the result is always exact).

Mechanisms that own learnable parameters (``additive``, ``general``, ...) cannot be called
functionally: build them with :func:`attnlab.create` and call the module.

The modules built for a call are cached, keyed on values that identify the hyperparameters
exactly (:func:`hparams_key`); a call with a tensor-valued (or otherwise unhashable)
hyperparameter, such as ``block_sparse``'s ``layout``, builds a fresh module every time.
"""

from __future__ import annotations

from typing import Any

import torch

from attnlab.registry import get, resolve_name
from attnlab.util.checks import check_bool

__all__ = ["attention", "choose_mechanism", "hparams_key"]

_CACHE: dict[tuple, torch.nn.Module] = {}
_SCALARS = (bool, int, float, str)


def choose_mechanism(need_weights: bool = False) -> str:
    """The name ``mechanism="auto"`` resolves to for these inputs."""
    return "reference" if need_weights else "sdpa"


def _value_key(value: Any):
    """A hashable key equal only for equal values of the same type, or ``None`` where
    there is none (a tensor, an array, any other object).

    The type is part of the key (``1``, ``1.0`` and ``True`` are equal and hash alike in
    Python, but are different hyperparameters), and only the exact built-in types count:
    a subclass (an ``IntEnum``, NumPy's ``float64``) may compare equal while behaving
    differently. ``repr`` is not a key: a large tensor's repr elides its middle.
    """
    if value is None:
        return ("None",)
    if type(value) in _SCALARS:
        # float.hex is exact, tells -0.0 from 0.0 and makes every NaN the same key.
        return (type(value).__name__, value.hex() if type(value) is float else value)
    if type(value) in (tuple, list):
        items = tuple(_value_key(v) for v in value)
        return None if None in items else (type(value).__name__, items)
    return None


def hparams_key(hparams: dict[str, Any]) -> tuple | None:
    """The cache key of ``hparams``: sorted ``(name, value key)`` pairs, or ``None`` when
    a value has no exact hashable key (the module is then built fresh, never cached)."""
    items = []
    for name in sorted(hparams):
        key = _value_key(hparams[name])
        if key is None:
            return None
        items.append((name, key))
    return tuple(items)


def _module(name: str, hparams: dict[str, Any]) -> torch.nn.Module:
    spec = get(name)
    if spec.learnable:
        raise ValueError(
            f"attention: mechanism {spec.name!r} owns learnable parameters and cannot be "
            f"called functionally; use attnlab.create({spec.name!r}, ...) and call the module"
        )
    hp_key = hparams_key(hparams)
    if hp_key is None:
        return spec.cls(**hparams)
    key = (spec.name, hp_key)
    mod = _CACHE.get(key)
    if mod is None:
        mod = spec.cls(**hparams)
        _CACHE[key] = mod
    return mod


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    mechanism: str | None = None,
    need_weights: bool = False,
    enable_gqa: bool = False,
    **hparams: Any,
):
    """Attention with the SDPA contract (see :mod:`attnlab.contract`); ``enable_gqa`` lets
    ``k, v`` have fewer heads than ``q``, as in SDPA.

    Returns ``out`` ``(B, H, Nq, Dv)``, or ``(out, weights)`` when ``need_weights``.
    """
    # Checked before it chooses the mechanism: a truthy "no" must not select weights.
    need_weights = check_bool("need_weights", need_weights, who="attention")
    is_causal = check_bool("is_causal", is_causal, who="attention")
    if mechanism is None or mechanism == "auto":
        if hparams:
            raise TypeError(f"attention: hyperparameters {sorted(hparams)} need an explicit "
                            f"mechanism=...")
        name = choose_mechanism(need_weights)
    else:
        name = resolve_name(mechanism)
    return _module(name, hparams)(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
        dropout_p=dropout_p, need_weights=need_weights, enable_gqa=enable_gqa,
    )
