"""Named block layouts, so a sweep file (or ``--mechanisms``) can give ``block_sparse`` one.

``block_sparse`` takes its layout as a bool tensor (query blocks x key blocks), which a
TOML file cannot hold and whose size depends on the point's length. A sweep names it
instead, ``{name = "block_sparse", block_size = 256, layout = "band:1"}``, and each point
gets the tensor for its own ``N``:

* ``band:W``: block ``i`` sees key blocks ``j`` with ``|i - j| <= W``, for
  ``ceil(N / block_size)`` blocks (``band:0`` is the block diagonal, ``local``'s pattern;
  ``band:1`` is tri-diagonal: windows of ``block_size`` tokens that see one window back
  and one ahead, ``local_attention.LocalAttention``'s default pattern).

The name is what the grid keeps (the point's label and key, the stored hyperparameters);
the tensor exists only where the mechanism is built and validated.
"""

from __future__ import annotations

import math
import re

import torch

from attnlab.registry import get
from attnlab.util.checks import check_int

__all__ = ["MECHANISMS", "band", "resolve"]

#: The mechanisms whose ``layout`` hyperparameter may be given by name.
MECHANISMS = ("block_sparse",)
_BAND = re.compile(r"band:(0|[1-9][0-9]*)")


def band(n_blocks: int, width: int) -> torch.Tensor:
    """The ``(n_blocks, n_blocks)`` bool layout with ``|i - j| <= width``."""
    n_blocks = check_int("n_blocks", n_blocks, low=1, who="band")
    width = check_int("width", width, low=0, who="band")
    idx = torch.arange(n_blocks)
    return (idx[:, None] - idx[None, :]).abs() <= width


def resolve(mechanism: str, hparams: dict, n: int) -> dict:
    """``hparams`` with a named ``layout`` replaced by its tensor for length ``n`` (the
    mechanism's ``block_size``, given or its registry default); anything else unchanged."""
    layout = hparams.get("layout")
    if mechanism not in MECHANISMS or not isinstance(layout, str):
        return hparams  # anything else is the registry's to check
    m = _BAND.fullmatch(layout)
    if m is None:
        raise ValueError(f"{mechanism}: a named layout must be 'band:W' (W an int >= 0: the "
                         f"block diagonals kept on each side); got {layout!r}")
    default = next(h.default for h in get(mechanism).hparams if h.name == "block_size")
    block = check_int("block_size", hparams.get("block_size", default), low=1, who=mechanism)
    return {**hparams, "layout": band(math.ceil(n / block), int(m.group(1)))}
