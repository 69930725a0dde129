"""``attnlab.attention``: one entry point for every parameter-free mechanism.

``mechanism=None`` (or ``"auto"``) dispatches, in the manner of xFormers, to the
fastest *exact* implementation that is correct for the inputs:

* ``need_weights=True`` -> ``reference`` (the only exact path that forms the weights
  without recomputing them);
* otherwise -> ``sdpa`` (PyTorch's fused kernels; they fall back to the math kernel
  for inputs they cannot take, so the result is always exact).

Mechanisms that own learnable parameters (``additive``, ``general``, ...) cannot be called
functionally: build them with :func:`attnlab.create` and call the module.
"""

from __future__ import annotations

from typing import Any

import torch

from attnlab.registry import get, resolve_name

__all__ = ["attention", "choose_mechanism"]

_CACHE: dict[tuple, torch.nn.Module] = {}


def choose_mechanism(need_weights: bool = False) -> str:
    """The name ``mechanism="auto"`` resolves to for these inputs."""
    return "reference" if need_weights else "sdpa"


def _module(name: str, hparams: dict[str, Any]) -> torch.nn.Module:
    spec = get(name)
    if spec.learnable:
        raise ValueError(
            f"attention: mechanism {spec.name!r} owns learnable parameters and cannot be "
            f"called functionally; use attnlab.create({spec.name!r}, ...) and call the module"
        )
    key = (spec.name, tuple(sorted((k, repr(v)) for k, v in hparams.items())))
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
    **hparams: Any,
):
    """Attention with the SDPA contract (see :mod:`attnlab.contract`).

    Returns ``out`` ``(B, H, Nq, Dv)``, or ``(out, weights)`` when ``need_weights``.
    """
    if mechanism is None or mechanism == "auto":
        if hparams:
            raise TypeError(f"attention: hyperparameters {sorted(hparams)} need an explicit "
                            f"mechanism=...")
        name = choose_mechanism(need_weights)
    else:
        name = resolve_name(mechanism)
    return _module(name, hparams)(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
        dropout_p=dropout_p, need_weights=need_weights,
    )
