"""Masks for image inpainting: which pixels a model must fill in.

Images are ``(N, C, H, W)`` floats in ``[0, 1]``; a mask is a bool ``(N, 1, H, W)`` tensor
with ``True`` = **missing** pixel (the model has to predict it), shared by every channel.
Masks are drawn from their own ``torch.Generator`` seeded by ``seed``, so the same call
gives the same masks on every machine and never disturbs the global RNG.

Three kinds, each a classic inpainting benchmark setting:

* ``"box"``: one axis-aligned rectangle per image, its height and width each a fraction of
  the image side drawn uniformly from ``box_size`` (as in context encoders, Pathak et al.
  2016, with a random rather than a central box), placed uniformly inside the image.
* ``"random_patches"``: the image cut into ``patch_size x patch_size`` squares and exactly
  ``round(patch_fraction * num_patches)`` of them missing, chosen uniformly without
  replacement per image (the masked-autoencoder setting, He et al. 2022). With
  ``patch_size`` equal to a ViT's patch, every patch is either fully seen or fully missing.
* ``"half"``: one half of the image missing (image completion): the bottom rows by default,
  ``half_side="random"`` draws top/bottom/left/right per image. For an odd side the missing
  half is the larger one (``H - H // 2`` rows).
"""

from __future__ import annotations

import torch

__all__ = ["MASK_KINDS", "apply_mask", "make_masks", "mask_coverage"]

MASK_KINDS = ("box", "random_patches", "half")
HALF_SIDES = ("bottom", "top", "left", "right", "random")


def _pos_int(name: str, value) -> int:
    # bool is an int subclass: True must not silently mean 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"make_masks: {name} must be an int; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"make_masks: {name} must be >= 1; got {value!r}")
    return value


def _fraction_range(value) -> tuple[float, float]:
    """``box_size`` as ``(low, high)`` with ``0 < low <= high <= 1``."""
    pair = (value, value) if isinstance(value, (int, float)) else value
    ok = (isinstance(pair, (tuple, list)) and len(pair) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair))
    if not ok:
        raise TypeError(f"make_masks: box_size must be a float or a (low, high) pair of floats; "
                        f"got {value!r}")
    lo, hi = float(pair[0]), float(pair[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"make_masks: box_size must satisfy 0 < low <= high <= 1 (a fraction "
                         f"of the image side); got {value!r}")
    return lo, hi


def make_masks(
    n: int,
    h: int,
    w: int,
    *,
    kind: str = "box",
    box_size: float | tuple[float, float] = (0.25, 0.5),
    patch_size: int = 4,
    patch_fraction: float = 0.5,
    half_side: str = "bottom",
    seed: int = 0,
) -> torch.Tensor:
    """``n`` inpainting masks for ``h x w`` images: bool ``(n, 1, h, w)``, ``True`` = missing.

    Args:
        n, h, w: number of masks and image size.
        kind: ``"box"``, ``"random_patches"`` or ``"half"`` (see the module docstring).
        box_size: (``box``) side of the box as a fraction of the image side, a float or a
            ``(low, high)`` range drawn uniformly, independently for height and width; each
            side is at least one pixel.
        patch_size: (``random_patches``) size of the square patches; must divide ``h`` and
            ``w``. Use the ViT's ``patch_size``.
        patch_fraction: (``random_patches``) fraction of patches missing, in ``[0, 1]``;
            exactly ``round(patch_fraction * num_patches)`` per image.
        half_side: (``half``) ``"bottom"``, ``"top"``, ``"left"``, ``"right"`` or
            ``"random"`` (one of the four per image).
        seed: seeds a private ``torch.Generator``: same arguments, same masks.
    """
    n, h, w = _pos_int("n", n), _pos_int("h", h), _pos_int("w", w)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"make_masks: seed must be an int; got {type(seed).__name__} {seed!r}")
    if kind not in MASK_KINDS:
        raise ValueError(f"make_masks: kind must be one of {list(MASK_KINDS)}; got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "box":
        return _boxes(n, h, w, _fraction_range(box_size), gen)
    if kind == "random_patches":
        return _patches(n, h, w, _pos_int("patch_size", patch_size), patch_fraction, gen)
    return _halves(n, h, w, half_side, gen)


def _boxes(n: int, h: int, w: int, size: tuple[float, float], gen) -> torch.Tensor:
    lo, hi = size
    frac = lo + (hi - lo) * torch.rand(n, 2, generator=gen, dtype=torch.float64)
    bh = (frac[:, 0] * h).round().clamp(1, h).long()
    bw = (frac[:, 1] * w).round().clamp(1, w).long()
    # Top-left corner uniform over the positions that keep the box inside the image.
    top = (torch.rand(n, generator=gen, dtype=torch.float64) * (h - bh + 1)).floor().long()
    left = (torch.rand(n, generator=gen, dtype=torch.float64) * (w - bw + 1)).floor().long()
    rows, cols = torch.arange(h), torch.arange(w)
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])  # (n, h)
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])  # (n, w)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def _patches(n: int, h: int, w: int, p: int, fraction, gen) -> torch.Tensor:
    if h % p or w % p:
        raise ValueError(f"make_masks: patch_size must divide the image size; got "
                         f"patch_size={p} for h={h}, w={w}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"make_masks: patch_fraction must be a float; got "
                        f"{type(fraction).__name__} {fraction!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"make_masks: patch_fraction must be in [0, 1]; got {fraction!r}")
    gh, gw = h // p, w // p
    count = round(fraction * gh * gw)
    # The `count` smallest of i.i.d. uniforms: a uniformly random subset of exactly that size.
    order = torch.rand(n, gh * gw, generator=gen).argsort(dim=1)
    grid = torch.zeros(n, gh * gw, dtype=torch.bool)
    grid.scatter_(1, order[:, :count], True)
    grid = grid.view(n, gh, gw)
    return grid.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)[:, None]


def _halves(n: int, h: int, w: int, side: str, gen) -> torch.Tensor:
    if side not in HALF_SIDES:
        raise ValueError(f"make_masks: half_side must be one of {list(HALF_SIDES)}; got {side!r}")
    sides = HALF_SIDES[:4]
    if side == "random":
        picks = torch.randint(0, 4, (n,), generator=gen).tolist()
    else:
        picks = [sides.index(side)] * n
    rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
    shapes = {  # the larger half for an odd side: H - H // 2 rows
        "bottom": (rows >= h // 2).expand(h, w),
        "top": (rows < h - h // 2).expand(h, w),
        "left": (cols < w - w // 2).expand(h, w),
        "right": (cols >= w // 2).expand(h, w),
    }
    return torch.stack([shapes[sides[i]] for i in picks])[:, None].clone()


def _check_pair(images: torch.Tensor, mask: torch.Tensor, who: str) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"{who}: images must be a floating-point torch.Tensor; got "
                        f"{getattr(images, 'dtype', type(images).__name__)}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{who}: mask must be a bool torch.Tensor (True = missing); got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if images.dim() != 4 or mask.dim() != 4:
        raise ValueError(f"{who}: images must be (N, C, H, W) and mask (N, 1, H, W); got "
                         f"images {tuple(images.shape)}, mask {tuple(mask.shape)}")
    n, c, h, w = images.shape
    if mask.shape[0] != n or mask.shape[2:] != (h, w) or mask.shape[1] not in (1, c):
        raise ValueError(f"{who}: mask must be (N, 1, H, W) or (N, C, H, W) = "
                         f"({n}, 1 or {c}, {h}, {w}) to match images; got {tuple(mask.shape)}")


def apply_mask(images: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """A copy of ``images`` ``(N, C, H, W)`` with the missing pixels (``mask`` True, shape
    ``(N, 1, H, W)`` broadcast over channels) set to ``fill``: what the model gets to see."""
    _check_pair(images, mask, "apply_mask")
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        raise TypeError(f"apply_mask: fill must be a float; got {type(fill).__name__} {fill!r}")
    return images.masked_fill(mask.to(images.device), float(fill))


def mask_coverage(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of missing pixels per mask: ``(N,)`` float for a bool ``(N, 1, H, W)`` mask."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        raise TypeError(f"mask_coverage: mask must be a bool (N, 1, H, W) tensor; got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)} "
                        f"{tuple(getattr(mask, 'shape', ()))}")
    return mask.flatten(1).float().mean(dim=1)
