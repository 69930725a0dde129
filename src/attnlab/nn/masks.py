"""The one mask a layer hands its mechanism: ``attn_mask``, key padding and ALiBi combined.

Two bool conventions meet here, each kept from its origin: ``key_padding_mask`` is
``torch.nn.MultiheadAttention``'s (``True`` = padding, *ignore this key*), ``attn_mask``
and the result are attnlab's contract (``True`` = *may attend*). Float masks are added to
the scores; a pair is allowed only if every mask allows it (bool AND, float sum).
"""

from __future__ import annotations

import torch

from attnlab.contract import format_shape
from attnlab.nn.positional import alibi_bias

__all__ = ["additive", "combine", "layer_mask"]


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float form of a mask: bool ``True`` (may attend) -> 0, ``False`` -> ``-inf``."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~mask, float("-inf"))


def combine(a: torch.Tensor | None, b: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """One contract mask allowing a pair only if both allow it (bool AND, float sum)."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return additive(a, dtype) + additive(b, dtype)


def _check_kinds(attn_mask, kpm, who: str) -> None:
    for name, m in (("attn_mask", attn_mask), ("key_padding_mask", kpm)):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{who}{name} must be a torch.Tensor or None; "
                            f"got {type(m).__name__}")
        if m.dtype != torch.bool and not m.is_floating_point():
            what = "True = pad" if name == "key_padding_mask" else "True = may attend"
            raise TypeError(f"{who}{name} must be bool ({what}) or float (additive); "
                            f"got dtype {m.dtype}")


def layer_mask(attn_mask, kpm, *, full: tuple[int, int, int, int], spec, alibi: bool,
               causal: bool, dtype, device, offset: int = 0, who: str = ""):
    """``attn_mask``, ``key_padding_mask`` ``kpm`` and (``alibi``) ALiBi's bias, query
    ``i`` at position ``offset + i``, as one contract mask broadcastable to ``full`` =
    ``(B, H, Nq, Nk)``, or ``None``. ``spec`` is the mechanism's: a padding-only one takes
    bool key padding alone. Errors start with ``who``."""
    B, H, Nq, Nk = full
    _check_kinds(attn_mask, kpm, who)
    mask = None
    if attn_mask is not None:
        if not 1 <= attn_mask.dim() <= 4 or any(
            g not in (1, n)
            for g, n in zip(reversed(attn_mask.shape), reversed(full), strict=False)
        ):
            raise ValueError(f"{who}attn_mask must be broadcastable to (B, H, Nq, Nk) = "
                             f"{full}, e.g. (Nq, Nk); got {format_shape(attn_mask)}")
        mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
    if kpm is not None:
        if tuple(kpm.shape) != (B, Nk):
            raise ValueError(f"{who}key_padding_mask must have shape (B, Nk) = ({B}, {Nk}); "
                             f"got {format_shape(kpm)}")
        if kpm.dtype != torch.bool and not spec.arbitrary_mask:
            raise TypeError(f"{who}mechanism {spec.name!r} takes only bool key "
                            f"padding (True = pad), not an additive float "
                            f"key_padding_mask; got dtype {kpm.dtype}")
        # torch's True = pad becomes the contract's True = may attend.
        pad = ~kpm if kpm.dtype == torch.bool else kpm.to(dtype)
        mask = combine(mask, pad[:, None, None, :], dtype)
    if alibi:
        mask = combine(mask, alibi_bias(H, Nq, Nk, device, dtype, causal, offset=offset), dtype)
    return mask
