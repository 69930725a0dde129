"""What :class:`~attnlab.nn.MultiheadAttention` checks of its arguments and inputs: the
head sizes, the positions kind, each input tensor and the tokens' global positions. Every
message starts with the layer's name."""

from __future__ import annotations

import torch

from attnlab.contract import check_positions, format_shape
from attnlab.util.checks import check_choice, check_int

__all__ = ["POSITIONS", "check_input", "check_layer_positions", "head_sizes", "positions_kind"]

POSITIONS = ("rope", "alibi")
_WHO = "MultiheadAttention"
_W = f"{_WHO}: "


def head_sizes(embed_dim, num_heads, num_kv_heads) -> tuple[int, int, int]:
    """``(E, H, Hkv)``, checked: ``H`` divides ``E`` and ``Hkv`` divides ``H``."""
    E, H = check_int("embed_dim", embed_dim, who=_WHO), check_int("num_heads", num_heads, who=_WHO)
    if E % H:
        raise ValueError(f"{_W}embed_dim must be divisible by num_heads; got "
                         f"embed_dim={E}, num_heads={H} (remainder {E % H})")
    Hkv = H if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, who=_WHO)
    if H % Hkv:
        valid = [d for d in range(1, H + 1) if H % d == 0]
        raise ValueError(f"{_W}num_kv_heads must divide num_heads={H}; got "
                         f"num_kv_heads={Hkv} (valid: {valid})")
    return E, H, Hkv


def positions_kind(value) -> str | None:
    if value is None:
        return None
    return check_choice("positions", value.lower() if isinstance(value, str) else value,
                        POSITIONS, who=_WHO)


def check_input(w: str, name: str, x, dim: int, batch: int | None, want: torch.dtype,
                batch_first: bool) -> None:
    """A layer input: a floating tensor of the layer's dtype ``want`` (autocast aside),
    3-D with feature size ``dim`` and, where ``batch`` is given, that batch size."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{w}{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{w}{name} must be a floating-point tensor of the module's dtype "
                        f"{want}; got {x.dtype} (token ids go through an embedding first)")
    # Under autocast the projections run in the autocast dtype, whatever the input's.
    if x.dtype != want and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{w}{name} dtype {x.dtype} does not match the module's dtype "
                        f"{want}; convert the input (.to({want})) or the module "
                        f"(.to({x.dtype}))")
    layout = "(B, N, E)" if batch_first else "(N, B, E)"
    if x.dim() != 3:
        raise ValueError(f"{w}{name} must be 3-D {layout} with E={dim}; "
                         f"got {x.dim()}-D shape {format_shape(x)}")
    if x.shape[-1] != dim:
        raise ValueError(f"{w}{name} feature size must be {dim}; got shape {format_shape(x)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{w}{name} batch size {x.shape[0]} does not match the "
                         f"query's {batch} (shape {format_shape(x)})")


def check_layer_positions(positions, layer_positions: str | None, self_attn: bool,
                          cached: bool, n: int, who: str) -> torch.Tensor:
    """An attention layer's ``positions`` (:class:`~attnlab.nn.MultiheadAttention`):
    ``(n,)`` global positions of self-attention's tokens, or an error naming them."""
    if not self_attn:
        raise ValueError(f"{who}positions are for self-attention (queries and keys are the "
                         f"same tokens); got key")
    if cached:
        raise ValueError(f"{who}positions cannot be given with a kv_cache (the new tokens "
                         f"sit after the cached ones); pass one or the other")
    if layer_positions == "alibi":
        raise ValueError(f"{who}positions='alibi' biases the scores by the distance in the "
                         f"order given; it takes no positions")
    return check_positions(who.rstrip(": "), "positions", positions, n)
