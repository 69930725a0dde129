"""The one check of a decoding state (``Mechanism.decode``'s ``state``), shared by every
engine that keeps one: a recurrent ``S`` (kernel, gated, delta) or a rolling window.

A state is the dict a previous ``decode`` returned: tensors under fixed keys plus ``"t"``,
the positions it has absorbed. Handing a layer another layer's state, another batch's or
another mechanism's would silently continue the wrong sequence, so each is refused by name.
"""

from __future__ import annotations

import torch

from attnlab.contract import format_shape

__all__ = ["check_decode_state"]


def check_decode_state(who: str, state, expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
                       device: torch.device, hint: str = "") -> None:
    """A ``TypeError``/``ValueError`` naming what is wrong unless ``state`` is ``None`` or a
    dict with exactly the keys of ``expected`` and ``"t"`` (an int >= 0), each tensor of the
    shape and dtype ``expected`` gives, on ``device``. ``hint`` names the shape's symbols."""
    if state is None:
        return
    if not isinstance(state, dict):
        raise TypeError(f"{who}.decode: state must be None or the dict a previous decode "
                        f"returned; got {type(state).__name__}")
    want = {*expected, "t"}
    if set(state) != want:
        raise ValueError(f"{who}.decode: state must have the keys {sorted(want)}; got "
                         f"{sorted(state)} (a state of another mechanism?)")
    t = state["t"]
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ValueError(f"{who}.decode: state['t'] must be an int >= 0 (positions absorbed);"
                         f" got {t!r}")
    for key, (shape, dtype) in expected.items():
        x = state[key]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}.decode: state[{key!r}] must be a torch.Tensor; got "
                            f"{type(x).__name__}")
        if tuple(x.shape) != tuple(shape) or x.dtype != dtype or x.device != device:
            raise ValueError(
                f"{who}.decode: state[{key!r}] {format_shape(x)} {x.dtype} on {x.device} does "
                f"not continue these inputs: expected {tuple(shape)} {dtype} on {device}"
                f"{' ' + hint if hint else ''}; a state serves one batch of one layer with the "
                f"same hyperparameters")
