"""Axial attention (Ho et al. 2019): attention along the rows of a 2-D grid, then its columns.

The ``N`` tokens are a ``rows x cols`` grid in raster order (token ``n = r * cols + c``).
Attention along one axis is ordinary softmax attention restricted to the tokens that share
the other coordinate; the layer here is the composition the paper stacks to reach the
whole grid (sec. 3, "attention along a single axis", applied to the width then the height):

.. math::

    y_{r,c} = \\sum_{c'} \\mathrm{softmax}_{c'}\\big(\\tau\\, q_{r,c} \\cdot k_{r,c'}
        + M\\big)\\, v_{r,c'}
    \\qquad \\text{(row attention)}

    \\mathrm{out}_{r,c} = \\sum_{r'} \\mathrm{softmax}_{r'}\\big(\\tau\\, q_{r,c} \\cdot
        k_{r',c} + M\\big)\\, y_{r',c}
    \\qquad \\text{(column attention)}

Row attention uses ``q, k`` within each row; column attention uses the same ``q, k``
within each column, with the row outputs ``y`` as its values: ``out = C (R v)`` with the
block-diagonal row weights ``R`` and column weights ``C``. Every output mixes every value
(``v_{r',c'}`` reaches ``(r, c)`` through ``y_{r',c}``), at ``O(N (rows + cols) D)``
time and ``O(N max(rows, cols))`` memory in a forward without autograd (the two steps'
scores exist one after the other; autograd keeps both, ``O(N (rows + cols))``).

``grid``: ``(rows, cols)`` (``N`` must be ``rows * cols``), or ``cols`` alone (``rows =
N / cols``, ``N`` a multiple of it). ``None`` (default): when ``max_seq_len`` is a perfect
square ``s^2``, an image of width ``s`` (``cols = s``, ``rows = N / s``: a prefix of whole
rows works); otherwise (no ``max_seq_len``, or not a square) the most nearly square grid
of each call's ``N``: ``cols`` the smallest divisor of ``N`` that is ``>= sqrt(N)``, ``rows
= N / cols`` (a prime ``N`` is one row: full attention, ``O(N^2)``).
:meth:`AxialAttention.grid_for` says which grid a length gets.

Causal form (this lab's, simpler than the paper's masked stack of row-causal and
previous-row layers): causal row attention (``c' <= c``), then causal column attention
(``r' <= r``). The output at ``(r, c)`` then reads only ``v_{r',c'}`` with ``r' <= r``,
``c' <= c``: raster positions ``<= r * cols + c``. It sees less than the raster past
(nothing above and to the right), but never the future.

``attn_mask`` (any 2-D to 4-D bool or additive mask over ``(Nq, Nk)``) applies to the
pairs each step scores: entry ``(i, j)`` where ``j`` is in ``i``'s row (row step) or
column (column step); a key-padding mask is one such mask. A query with no allowed key in
a step gets zeros from it (:func:`attnlab.contract.masked_softmax`). ``dropout_p`` drops
the weights of both steps. ``need_weights`` returns the effective ``(N, N)`` weights ``A =
C R`` (``out = A v``), formed only then. Self-attention only (``Nq == Nk``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnlab.contract import masked_softmax, work_dtype
from attnlab.mechanisms.base import Mechanism
from attnlab.registry import HParam, Limit, Paper, register_mechanism
from attnlab.verify import causal_allowed, dense_softmax_f64

__all__ = ["AxialAttention", "axial_reference", "most_square_grid"]

HO_2019 = Paper(
    "Axial Attention in Multidimensional Transformers",
    "Jonathan Ho, Nal Kalchbrenner, Dirk Weissenborn, Tim Salimans",
    2019,
    "https://arxiv.org/abs/1912.12180",
)


@dataclass(frozen=True)
class _GridHParam(HParam):
    """``grid``: ``(rows, cols)`` (a tuple, or a list as JSON gives it), ``cols`` alone (an
    int), or ``None``; every size an int ``>= 1``."""

    def _coerce(self, value, where):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if is_int(value):
            sizes = (value,)
        elif isinstance(value, (tuple, list)) and len(value) == 2 and all(map(is_int, value)):
            sizes = value = tuple(value)
        else:
            raise TypeError(f"{where} must be (rows, cols), an int cols or None; got "
                            f"{type(value).__name__} {value!r}")
        if min(sizes) < 1:
            raise ValueError(f"{where} sizes must be >= 1; got {value!r}")
        return value


def most_square_grid(n: int) -> tuple[int, int]:
    """``(rows, cols)`` with ``rows * cols = n``, ``cols`` the smallest divisor ``>= sqrt(n)``."""
    cols = next(c for c in range(math.isqrt(n), n + 1) if n % c == 0 and c * c >= n)
    return n // cols, cols


def _grid(mech_hp: dict, n: int) -> tuple[int, int]:
    """The grid of a length-``n`` call (see the module docstring), or a ``ValueError``."""
    grid, L = mech_hp["grid"], mech_hp["max_seq_len"]
    if isinstance(grid, tuple):
        if grid[0] * grid[1] != n:
            raise ValueError(f"axial: grid {grid} has {grid[0] * grid[1]} cells but the "
                             f"sequence has N={n} tokens; pass grid=(rows, cols) with "
                             f"rows * cols = N")
        return grid
    if grid is None and L is not None and math.isqrt(L) ** 2 == L:
        grid, why = math.isqrt(L), f" (grid=None: the width sqrt(max_seq_len={L}))"
    elif grid is None:
        return most_square_grid(n)
    else:
        why = ""
    if n % grid:
        raise ValueError(f"axial: N={n} tokens are not whole rows of cols={grid}{why}; pass "
                         f"grid=(rows, cols) with rows * cols = N, or cols dividing N")
    return n // grid, grid


def _line_mask(mask, rows: int, cols: int, axis: int):
    """The entries of a 4-D mask ``(B|1, H|1, Nq|1, Nk|1)`` that one step scores:
    ``axis = 0`` (rows) ``(B|1, H|1, rows, cols|1, cols|1)``, query ``(r, c)`` and key
    ``(r, c')``; ``axis = 1`` (columns) ``(B|1, H|1, cols, rows|1, rows|1)``, query
    ``(r, c)`` and key ``(r', c)``. ``None`` stays ``None``."""
    if mask is None:
        return None
    b, h, mq, mk = mask.shape
    shape = [b, h]
    for m in (mq, mk):
        shape += [rows, cols] if m > 1 or rows * cols == 1 else [1, 1]
    m6 = mask.reshape(shape)                            # (b, h, Rq, Cq, Rk, Ck)
    shared = (2, 4) if axis == 0 else (3, 5)            # the coordinate both tokens share
    full = list(m6.shape)
    for d in shared:
        full[d] = rows if axis == 0 else cols
    line = torch.diagonal(m6.expand(full), dim1=shared[0], dim2=shared[1])
    return line.movedim(-1, 2)


def _with_causal(mask, n: int):
    """``mask`` and the causal ``(n, n)`` tril of one step (bool or additive, as ``mask``)."""
    c = causal_allowed(n, n, None if mask is None else mask.device)
    if mask is None:
        return c
    if mask.dtype == torch.bool:
        return mask & c
    return torch.where(c, mask, float("-inf"))  # broadcast: mask may have size-1 dims


# ---------------------------------------------------------------- float64 reference
def axial_reference(q, k, v, *, mech, scale, is_causal, grid=None, attn_mask=None):
    """``out = C (R v)`` in float64 with dense ``(N, N)`` masks: ``R`` softmax over the
    keys of each query's row, ``C`` over its column (``j <= i`` too when causal), ``grid``
    the mechanism's at this length unless given; ``attn_mask`` a bool ``(N, N)``."""
    n = q.shape[-2]
    rows, cols = grid or mech.grid_for(n)
    r, c = torch.arange(n) // cols, torch.arange(n) % cols
    same_row, same_col = r[:, None] == r[None, :], c[:, None] == c[None, :]
    if is_causal:
        same_row, same_col = same_row & causal_allowed(n, n), same_col & causal_allowed(n, n)
    if attn_mask is not None:
        same_row, same_col = same_row & attn_mask, same_col & attn_mask
    s = q.double() @ k.double().transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None
                                                      else scale)
    y = dense_softmax_f64(s, v.double(), same_row)
    return dense_softmax_f64(s, y, same_col)


@register_mechanism(
    "axial",
    family="axial",
    paper=HO_2019,
    time="O(N (rows + cols) D)",
    memory="O(N max(rows, cols))",
    equation="y_{r,c} = sum_c' softmax_c'(scale q_{r,c}.k_{r,c'} + M) v_{r,c'};  "
             "out_{r,c} = sum_r' softmax_r'(scale q_{r,c}.k_{r',c} + M) y_{r',c}",
    exact=False,  # its own composition, not softmax attention (one row: it is)
    causal=True,
    arbitrary_mask=True,
    cross=False,
    returns_weights=True,
    hparams=[
        _GridHParam("grid", tuple, None, "(rows, cols), or cols alone (rows = N / cols); "
                    "None: width sqrt(max_seq_len) if a perfect square, else the most "
                    "nearly square grid of N", nullable=True),
        HParam("max_seq_len", int, None, "longest N; its square root is the default width",
               low=1, nullable=True),
    ],
    tiny_hparams=dict(grid=4),  # cols: 16 tokens are 4 x 4, 64 are 16 x 4
    limit=Limit(hparams=lambda n: {"grid": (1, n)},
                note="grid (1, N): one row, exact attention"),
)
class AxialAttention(Mechanism):
    """Axial attention: softmax attention within each row of the grid, then within each column
    (the row outputs as values); see the module docstring for the grid and the causal form."""

    def grid_for(self, n: int) -> tuple[int, int]:
        """``(rows, cols)`` of a length-``n`` call (``ValueError`` if ``grid`` does not fit)."""
        return _grid(self.hp, n)

    def _step(self, q, k, v, mask, dropout_p):
        """Softmax attention over the last-but-one axis of ``(B, H, lines, L, D)`` tensors
        (``q`` already scaled: no second scores-sized tensor)."""
        p = masked_softmax(q @ k.transpose(-2, -1), mask)
        return (F.dropout(p, dropout_p) if dropout_p > 0 else p) @ v, p

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        B, H, n, _ = q.shape
        rows, cols = self.grid_for(n)
        dtype, work = v.dtype, work_dtype(q.dtype)
        q = q.to(work) * scale  # in the work dtype: a large scale cannot overflow float16
        q, k, v = (t.to(work).reshape(B, H, rows, cols, t.shape[-1]) for t in (q, k, v))
        row_mask = _line_mask(attn_mask, rows, cols, 0)
        col_mask = _line_mask(attn_mask, rows, cols, 1)
        if is_causal:
            row_mask, col_mask = _with_causal(row_mask, cols), _with_causal(col_mask, rows)
        y, p_row = self._step(q, k, v, row_mask, dropout_p)     # (B, H, rows, cols, Dv)
        out, p_col = self._step(q.transpose(2, 3), k.transpose(2, 3), y.transpose(2, 3),
                                col_mask, dropout_p)            # (B, H, cols, rows, Dv)
        out = out.transpose(2, 3).reshape(B, H, n, -1).to(dtype)
        if not need_weights:
            return out, None
        # A[(r, c), (s, t)] = C[c][r, s] R[s][c, t]: through the token (s, c) only.
        A = torch.einsum("bhcrs,bhsct->bhrcst", p_col, p_row).reshape(B, H, n, n)
        return out, A.to(dtype)
