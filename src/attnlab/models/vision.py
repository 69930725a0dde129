r"""Image inpainting models: a ViT with any registered attention mechanism, and a U-Net.

Both take ``(masked_images, mask)`` -- images ``(B, C, H, W)`` in ``[0, 1]`` and a bool mask
``(B, 1, H, W)`` with ``True`` = missing pixel (see :mod:`attnlab.data.inpaint`) -- and
return a full image: the input where the pixel was seen, the model's prediction (a sigmoid,
so in ``(0, 1)``) where it was missing,

.. math:: \hat x = m \odot \sigma(f(x \odot (1 - m), m)) + (1 - m) \odot x.

Missing pixels are zeroed inside ``forward`` whatever the caller filled them with, so
passing the unmasked image cannot leak the answer. The mask is given to the network as an
extra input channel: a zero pixel and a missing pixel are then told apart.

:func:`inpainting_loss` is the mean squared error over the missing pixels only; the seen
pixels are copied and carry no error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import nn

from attnlab.models.args import attn_positions, check_mechanism
from attnlab.nn import MultiheadAttention
from attnlab.registry import get
from attnlab.util.checks import check_choice, check_float, check_int

__all__ = ["POSITIONS", "UNetInpainter", "ViTInpainter", "inpainting_loss"]

POSITIONS = ("learned", "sinusoidal", "rope", "alibi")


def _check_inputs(who: str, x, mask, channels: int, size: int | None) -> torch.Tensor:
    """Validate ``(masked_images, mask)``; return the mask as a float ``(B, 1, H, W)``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{who}: masked_images must be a floating-point tensor; got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{who}: masked_images must be (B, {channels}, H, W); got "
                         f"{tuple(x.shape)}")
    if size is not None and tuple(x.shape[2:]) != (size, size):
        raise ValueError(f"{who}: masked_images must be {size}x{size} (image_size={size}); "
                         f"got {tuple(x.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{who}: mask must be a bool tensor (True = missing); got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    want = (x.shape[0], 1, *x.shape[2:])
    if tuple(mask.shape) != want:
        raise ValueError(f"{who}: mask must be (B, 1, H, W) = {want}; got {tuple(mask.shape)}")
    return mask.to(x.dtype)


def _compose(x: torch.Tensor, m: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Prediction where missing, the input where seen (``m`` float, 1 = missing)."""
    return torch.where(m.bool(), torch.sigmoid(logits), x)


def inpainting_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Mean squared error over the missing pixels:
    :math:`\sum m (\hat x - x)^2 / \sum m`, with ``mask`` ``(B, 1, H, W)`` broadcast over
    the channels (each missing pixel counts once per channel).

    An all-False mask has no missing pixel: the loss is 0 (still connected to ``pred``'s
    graph so ``backward`` works).
    """
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"inpainting_loss: {name} must be a floating-point tensor; got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if pred.shape != target.shape:
        raise ValueError(f"inpainting_loss: pred {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} must have the same shape")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"inpainting_loss: mask must be a bool tensor (True = missing); got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if pred.dim() != 4 or mask.dim() != 4 or mask.shape[1] != 1 or (
            mask.shape[0], *mask.shape[2:]) != (pred.shape[0], *pred.shape[2:]):
        raise ValueError(f"inpainting_loss: mask must be (B, 1, H, W) for pred (B, C, H, W); "
                         f"got mask {tuple(mask.shape)}, pred {tuple(pred.shape)}")
    m = mask.to(pred.dtype).expand_as(pred)
    count = m.sum()
    sq = (pred - target.to(pred.dtype)).square() * m
    return sq.sum() / count.clamp_min(1.0)


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    r"""Fixed 2-D sine-cosine positions ``(grid*grid, dim)`` for a raster of patches (as in
    MAE, He et al. 2022): half of the channels encode the row, half the column, each with
    the 1-D form of Vaswani et al. 2017, :math:`PE(p, 2i) = \sin(p / 10000^{2i/d'})`,
    :math:`PE(p, 2i+1) = \cos(\cdot)`, :math:`d' = d/2`."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    ang = pos[:, None] * omega[None, :]  # (grid, quarter)
    one_d = torch.cat([ang.sin(), ang.cos()], dim=1)  # (grid, dim/2)
    rows = one_d[:, None, :].expand(grid, grid, dim // 2)
    cols = one_d[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()


class _EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block (as in ViT): ``x + Attn(LN(x))``, then
    ``x + MLP(LN(x))`` with a GELU MLP."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, mechanism: str,
                 positions: str | None, num_tokens: int, mechanism_kwargs: dict) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MultiheadAttention(d_model, num_heads, mechanism, dropout=dropout,
                                       positions=positions, max_seq_len=num_tokens,
                                       **mechanism_kwargs)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        res = self.attn(self.norm1(x), need_weights=need_weights)
        a, w = res if need_weights else (res, None)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return (x, w) if need_weights else x


class ViTInpainter(nn.Module):
    """Vision transformer inpainter (patches as in Dosovitskiy et al. 2021, "An Image is
    Worth 16x16 Words"), with any registered attention mechanism in its encoder.

    The masked image and its mask (an extra channel) are cut into ``patch_size`` squares,
    ``N = (image_size / patch_size)^2`` tokens; each is linearly embedded, positions are
    added, ``num_layers`` pre-norm encoder blocks run, and a linear head maps every token
    back to its patch's pixels. No class token: every token is an output.

    Positions: ``"learned"`` (a trained ``(N, d_model)`` table, ViT's choice),
    ``"sinusoidal"`` (fixed 2-D sine-cosine, row and column each in half of the channels;
    ``d_model`` divisible by 4), or ``"rope"`` / ``"alibi"`` inside attention. RoPE and
    ALiBi are 1-D: they see the patches in raster order, so vertical neighbours are
    ``image_size / patch_size`` positions apart. ALiBi needs a mechanism that takes an
    arbitrary mask.

    ``mechanism_kwargs`` are the mechanism's hyperparameters (e.g. ``{"num_landmarks": 8}``
    for ``nystromformer``); ``head_dim``, ``num_heads`` and ``max_seq_len = N`` are filled
    in where a mechanism declares them, and so is ``grid``, the patch grid ``(rows, cols)``,
    for a mechanism over a 2-D grid (``axial``) when not given. Filled values are derived:
    ``config`` keeps the kwargs as given.
    """

    def __init__(self, image_size: int = 28, patch_size: int = 4, in_channels: int = 1, *,
                 mechanism: str = "sdpa", mechanism_kwargs: dict | None = None,
                 d_model: int = 128, num_heads: int = 4, num_layers: int = 4,
                 d_ff: int | None = None, dropout: float = 0.0,
                 positions: str = "learned") -> None:
        super().__init__()
        who = "ViTInpainter"
        image_size = check_int("image_size", image_size, who=who)
        patch_size = check_int("patch_size", patch_size, who=who)
        if image_size % patch_size:
            raise ValueError(f"{who}: image_size must be divisible by patch_size; got "
                             f"image_size={image_size}, patch_size={patch_size}")
        in_channels = check_int("in_channels", in_channels, who=who)
        d_model = check_int("d_model", d_model, who=who)
        num_heads = check_int("num_heads", num_heads, who=who)
        if d_model % num_heads:
            raise ValueError(f"{who}: d_model must be divisible by num_heads; got "
                             f"d_model={d_model}, num_heads={num_heads}")
        num_layers = check_int("num_layers", num_layers, who=who)
        d_ff = 4 * d_model if d_ff is None else check_int("d_ff", d_ff, who=who)
        dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False,
                              who=who)
        check_choice("positions", positions, POSITIONS, who=who)
        if positions == "sinusoidal" and d_model % 4:
            raise ValueError(f"{who}: positions='sinusoidal' (2-D) needs d_model divisible "
                             f"by 4; got d_model={d_model}")
        name, mechanism_kwargs = check_mechanism(who, "mechanism", mechanism, mechanism_kwargs)
        spec = get(name)
        self.spec = spec
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.grid = image_size // patch_size
        self.num_patches = self.grid ** 2
        self.config = {
            "image_size": image_size, "patch_size": patch_size, "in_channels": in_channels,
            "mechanism": spec.name, "mechanism_kwargs": dict(mechanism_kwargs),
            "d_model": d_model, "num_heads": num_heads, "num_layers": num_layers,
            "d_ff": d_ff, "dropout": dropout, "positions": positions,
        }
        patch_in = (in_channels + 1) * patch_size ** 2  # + the mask channel
        self.embed = nn.Linear(patch_in, d_model)
        self._build_positions(positions, d_model)
        built_kwargs = dict(mechanism_kwargs)
        if any(h.name == "grid" for h in spec.hparams) and "grid" not in built_kwargs:
            built_kwargs["grid"] = (self.grid, self.grid)  # tokens are the patches' raster
        self.blocks = nn.ModuleList(
            _EncoderBlock(d_model, num_heads, d_ff, dropout, spec.name, attn_positions(positions),
                          self.num_patches, dict(built_kwargs))
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, in_channels * patch_size ** 2)

    def _build_positions(self, positions: str, d_model: int) -> None:
        """The patch positions added to the embedding ("learned", "sinusoidal" 2-D); RoPE
        and ALiBi act in the attention layers instead."""
        self.pos_embed = None
        if positions == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, d_model))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif positions == "sinusoidal":
            # Derived data: not persistent, so the state_dict holds only what is learned.
            self.register_buffer("pos_table", _sincos_2d(self.grid, d_model)[None],
                                 persistent=False)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, N, C p p)``, patches in raster order."""
        B, C, H, W = x.shape
        p, g = self.patch_size, self.grid
        return x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, N, C p p) -> (B, C, H, W)``, the inverse of :meth:`patchify`."""
        B = t.shape[0]
        p, g, C = self.patch_size, self.grid, self.in_channels
        return t.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, g * p, g * p)

    def _tokens(self, masked_images, mask):
        m = _check_inputs("ViTInpainter", masked_images, mask, self.in_channels,
                          self.image_size)
        x = masked_images.masked_fill(mask, 0.0)  # never let a missing pixel's value in
        h = self.embed(self.patchify(torch.cat([x, m], dim=1)))
        if self.pos_embed is not None:
            h = h + self.pos_embed
        elif hasattr(self, "pos_table"):
            h = h + self.pos_table.to(h.dtype)
        return x, m, h

    def forward(self, masked_images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Inpaint: ``(B, C, H, W)`` images and bool ``(B, 1, H, W)`` mask -> images."""
        x, m, h = self._tokens(masked_images, mask)
        for block in self.blocks:
            h = block(h)
        logits = self.unpatchify(self.head(self.norm(h)))
        return _compose(x, m, logits)

    @torch.no_grad()
    def attention_maps(self, masked_images: torch.Tensor, mask: torch.Tensor) -> list:
        """Per-layer attention weights, a list of ``num_layers`` tensors ``(B, H, N, N)``
        over the ``N`` patches (raster order), computed in eval mode (no dropout) and without
        gradients; the effective weights ``A`` (``out = A v``) for a mechanism that never forms
        them (see :class:`~attnlab.nn.MultiheadAttention`)."""
        was = self.training
        self.eval()  # no dropout: deterministic maps, deeper layers included
        try:
            _, _, h = self._tokens(masked_images, mask)
            maps = []
            for block in self.blocks:
                h, w = block(h, need_weights=True)
                maps.append(w)
        finally:
            self.train(was)
        return maps

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _norm(ch: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: statistics per image, so tiny batches and eval mode agree.
    return nn.GroupNorm(math.gcd(8, ch), ch)


class _DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by a norm and a ReLU (the U-Net's unit)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), _norm(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), _norm(cout), nn.ReLU(inplace=True))


class UNetInpainter(nn.Module):
    """A small U-Net (Ronneberger et al. 2015) baseline for inpainting.

    ``depth`` times: two 3x3 convolutions then a 2x2 max-pool, doubling the channels from
    ``base_channels``; a bottleneck; then ``depth`` times a 2x2 up-convolution, the skip
    connection concatenated, two 3x3 convolutions; a 1x1 convolution to the pixels. Unlike
    the paper the convolutions are padded ("same") and normalised (GroupNorm), so the output
    has the input's size. Inputs are zero-padded (bottom/right) to a multiple of
    ``2**depth`` and cropped back: 28x28 and 8x8 both work at ``depth=2`` or more.
    """

    def __init__(self, in_channels: int = 1, *, base_channels: int = 32, depth: int = 2) -> None:
        super().__init__()
        who = "UNetInpainter"
        in_channels = check_int("in_channels", in_channels, who=who)
        base_channels = check_int("base_channels", base_channels, who=who)
        depth = check_int("depth", depth, who=who)
        self.in_channels, self.depth = in_channels, depth
        self.config = {"in_channels": in_channels, "base_channels": base_channels,
                       "depth": depth}
        chans = [base_channels * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels + 1  # + the mask channel
        for c in chans[:-1]:
            self.down.append(_DoubleConv(cin, c))
            cin = c
        self.bottleneck = _DoubleConv(chans[-2], chans[-1])
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for c_hi, c in zip(reversed(chans[1:]), reversed(chans[:-1]), strict=True):
            self.up.append(nn.ConvTranspose2d(c_hi, c, 2, stride=2))
            self.up_conv.append(_DoubleConv(2 * c, c))
        self.out = nn.Conv2d(chans[0], in_channels, 1)

    def forward(self, masked_images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Inpaint: ``(B, C, H, W)`` images and bool ``(B, 1, H, W)`` mask -> images."""
        m = _check_inputs("UNetInpainter", masked_images, mask, self.in_channels, None)
        x = masked_images.masked_fill(mask, 0.0)
        H, W = x.shape[2:]
        mult = 2 ** self.depth
        h = nnf.pad(torch.cat([x, m], dim=1), (0, -W % mult, 0, -H % mult))
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = nnf.max_pool2d(h, 2)
        h = self.bottleneck(h)
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips), strict=True):
            h = conv(torch.cat([up(h), skip], dim=1))
        logits = self.out(h)[:, :, :H, :W]
        return _compose(x, m, logits)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
