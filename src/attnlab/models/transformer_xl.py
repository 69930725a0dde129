r"""Transformer-XL (Dai et al. 2019, "Transformer-XL: Attentive Language Models Beyond a
Fixed-Length Context"): a decoder LM with segment-level recurrence.

Each layer :math:`n` keeps the hidden states :math:`m^{n-1}_\tau` that entered it on the
previous segment(s) and attends over them and the segment, with no gradient into them
(§3.2):

.. math:: \tilde h^{n-1}_{\tau+1} = [\mathrm{SG}(m^{n-1}_{\tau}) \circ h^{n-1}_{\tau+1}],
    \qquad q = h^{n-1}_{\tau+1} W_q^\top,\quad k = \tilde h^{n-1}_{\tau+1} W_{k,E}^\top,
    \quad v = \tilde h^{n-1}_{\tau+1} W_v^\top

Query ``i`` of a segment of ``N`` tokens sits at position ``M + i`` after ``M`` memory
positions and sees the keys ``j <= M + i``. ``attention="relative"`` scores with the
paper's relative positions (§3.3, :class:`RelativeAttention`); any registered mechanism that
takes an arbitrary ``(Nq, Nk)`` mask with ``Nq != Nk`` scores with RoPE at those absolute
offsets instead (RoPE is relative by construction; :class:`RotaryMemoryAttention`).

The block is pre-norm, as the house's :class:`~attnlab.models.blocks.TransformerBlock` (the
paper is post-norm): ``LN`` acts position by position, so normalising ``[m; h]`` is the same
as caching normalised states. No dropout on the attention weights (the house's rule; the
paper's ``dropatt`` is left out), tied output embedding as in
:class:`~attnlab.models.lm.DecoderLM`, no absolute positions in the embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import check_ids, format_shape, masked_softmax
from attnlab.models.args import check_mechanism
from attnlab.models.blocks import ModelBase, TokenEmbedding, sinusoidal_table
from attnlab.nn.positional import RotaryEmbedding
from attnlab.registry import create_for, list_mechanisms
from attnlab.util.checks import check_float, check_int

__all__ = ["TransformerXL", "RelativeAttention", "RotaryMemoryAttention", "memory_mask",
           "relative_index"]

_WHO = "TransformerXL"
NEEDED_FLAGS = ("arbitrary_mask", "cross")  # the memory mask is (N, M + N), not square


def memory_mask(n: int, m: int, device=None) -> torch.Tensor:
    """``(n, m + n)`` bool, ``True`` = may attend: query ``i`` (position ``m + i``) sees
    the ``m`` memory keys and the segment's keys ``j <= m + i``."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m + n, device=device)[None, :]
    return j <= m + i


def relative_index(n: int, m: int, device=None) -> torch.Tensor:
    """``(n, m + n)`` long: the distance ``(m + i) - j`` of query ``i`` to key ``j``,
    clamped at 0 where the key is in the future (those pairs are masked)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m + n, device=device)[None, :]
    return (m + i - j).clamp(min=0)


class RelativeAttention(nn.Module):
    r"""The paper's relative positional attention (§3.3, eq. for :math:`A^{rel}_{i,j}`):

    .. math:: A^{rel}_{i,j} = \underbrace{E_{x_i}^\top W_q^\top W_{k,E} E_{x_j}}_{(a)}
        + \underbrace{E_{x_i}^\top W_q^\top W_{k,R} R_{i-j}}_{(b)}
        + \underbrace{u^\top W_{k,E} E_{x_j}}_{(c)}
        + \underbrace{v^\top W_{k,R} R_{i-j}}_{(d)}

    i.e. with :math:`q_i = W_q h_i`, :math:`k_j = W_{k,E} \tilde h_j`:
    :math:`A_{ij} = (q_i + u)^\top k_j + (q_i + v)^\top W_{k,R} R_{i-j}`, then
    :math:`a = \mathrm{MaskedSoftmax}(A / \sqrt{d_h})\, V` per head and the output
    projection. :math:`R` is the sinusoid table of the distances (no parameters),
    :math:`W_{k,R}` learned per layer, :math:`u, v` learned per layer and head.

    The (b)+(d) term is computed once per *distance* ``0 .. M+N-1``, ``(N, M+N)`` values per
    head, then gathered to the pairs by :func:`relative_index` (exact, the same result as the
    paper's "relative shift" without its padding trick). Memory ``O(N (M + N))``.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)        # W_q
        self.k_proj = nn.Linear(d_model, d_model, bias=False)        # W_{k,E}
        self.v_proj = nn.Linear(d_model, d_model, bias=False)        # W_v
        self.r_proj = nn.Linear(d_model, d_model, bias=False)        # W_{k,R}
        self.out_proj = nn.Linear(d_model, d_model)
        self.u = nn.Parameter(torch.empty(num_heads, self.head_dim))
        self.v = nn.Parameter(torch.empty(num_heads, self.head_dim))
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.r_proj):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.out_proj.bias)
        nn.init.normal_(self.u, std=0.02)  # the authors' code: N(0, init_std = 0.02)
        nn.init.normal_(self.v, std=0.02)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def scores(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``A^{rel}`` before scaling and masking, ``(B, H, N, M+N)``: queries from ``x``
        ``(B, N, d)``, keys from ``context`` ``(B, M+N, d)`` whose last ``N`` rows are ``x``."""
        n, total = x.shape[1], context.shape[1]
        q, k = self._split(self.q_proj(x)), self._split(self.k_proj(context))
        R = sinusoidal_table(total, x.shape[-1]).to(device=x.device, dtype=x.dtype)
        r = self.r_proj(R).view(total, self.num_heads, self.head_dim).transpose(0, 1)
        ac = (q + self.u[:, None]) @ k.transpose(-1, -2)              # (a) + (c)
        bd_by_distance = (q + self.v[:, None]) @ r.transpose(-1, -2)  # (b) + (d), (.., N, d)
        idx = relative_index(n, total - n, x.device).expand(*bd_by_distance.shape[:2], -1, -1)
        return ac + torch.gather(bd_by_distance, -1, idx)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, total = x.shape[1], context.shape[1]
        a = self.scores(x, context) * self.head_dim ** -0.5
        p = masked_softmax(a, memory_mask(n, total - n, x.device))
        out = p @ self._split(self.v_proj(context))
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


class RotaryMemoryAttention(nn.Module):
    """A registered mechanism over ``[memory; segment]``: RoPE rotates the keys at positions
    ``0 .. M+N-1`` and the queries at ``M .. M+N-1``, and the mechanism gets the
    :func:`memory_mask`. Its own projections (``attnlab.nn.MultiheadAttention`` rotates q and
    k from the same offset, which a memory longer than zero breaks)."""

    def __init__(self, d_model: int, num_heads: int, mechanism: str, mechanism_kwargs: dict,
                 max_len: int, rope_base: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        if self.head_dim % 2:
            raise ValueError(f"{_WHO}: RoPE needs an even head_dim = d_model // num_heads; "
                             f"got {self.head_dim}")
        self.attn = create_for(mechanism, head_dim=self.head_dim, num_heads=num_heads,
                               max_seq_len=max_len, **mechanism_kwargs)
        spec = self.attn.spec  # a hybrid's: its parts' AND
        missing = [f for f in NEEDED_FLAGS if not getattr(spec, f)]
        if spec.inputs != "qkv" or missing:
            able = sorted(set(list_mechanisms(arbitrary_mask=True))
                          & set(list_mechanisms(cross=True)))
            raise ValueError(f"{_WHO}: attention={mechanism!r} cannot attend over a memory: "
                             f"it lacks registry flag(s) {missing or ['inputs=qkv']} (the "
                             f"memory-and-causal mask is an arbitrary (N, M+N) mask); choose "
                             f"'relative' or one of {able}")
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(d_model, d_model) for _ in range(4))
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, m = x.shape[1], context.shape[1] - x.shape[1]
        q = self.rotary.rotate(self._split(self.q_proj(x)), m)
        k = self.rotary.rotate(self._split(self.k_proj(context)), 0)
        out = self.attn(q, k, self._split(self.v_proj(context)),
                        attn_mask=memory_mask(n, m, x.device))
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


class XLBlock(nn.Module):
    """Pre-norm layer over ``[SG(memory); h]``: ``h + Drop(Attn(LN(h), LN([m; h])))``, then
    ``+ Drop(FFN(LN(.)))``."""

    def __init__(self, d_model: int, attention: nn.Module, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(d_model), attention, nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(d_ff, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        context = h if memory is None else torch.cat([memory.detach(), h], dim=1)  # SG(m)
        c = self.norm1(context)
        h = h + self.dropout(self.attn(c[:, c.shape[1] - h.shape[1]:], c))
        return h + self.dropout(self.ff(self.norm2(h)))


class TransformerXL(ModelBase):
    """Decoder LM with segment-level recurrence (see the module docstring).

    ``forward(ids (B, N), mems=None, *, mem_len=None, num_logits=None) -> (logits (B, N, V),
    new_mems)``: ``mems`` one ``(B, M, d_model)`` tensor per layer (the states that entered
    it before; ``None``: no memory), ``new_mems[l]`` the last ``mem_len`` (default: the
    model's ``mem_len``) positions of ``[mems[l]; input of layer l]``, detached.
    ``num_logits``: logits of the last ``num_logits`` positions only (a recomputed context
    needs no prediction for its first tokens). ``M + N`` may not exceed ``max_len`` (the
    attention span; it also sizes mechanisms that need one).
    """

    def __init__(self, vocab_size: int, *, attention: str = "relative",
                 mechanism_kwargs: dict | None = None, d_model: int = 128, num_heads: int = 4,
                 num_layers: int = 2, d_ff: int | None = None, dropout: float = 0.1,
                 max_len: int = 512, mem_len: int = 128, rope_base: float = 10000.0) -> None:
        super().__init__()
        w = _WHO
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("num_heads", num_heads), ("num_layers", num_layers),
                            ("max_len", max_len)):
            check_int(name, value, who=w)
        check_int("d_ff", d_ff, nullable=True, who=w)
        check_int("mem_len", mem_len, low=0, who=w)
        dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False, who=w)
        rope_base = check_float("rope_base", rope_base, low=1.0, who=w)
        if d_model % num_heads:
            raise ValueError(f"{w}: d_model must be divisible by num_heads; got d_model="
                             f"{d_model}, num_heads={num_heads}")
        if not isinstance(attention, str):
            raise TypeError(f"{w}: attention must be 'relative' or a registered mechanism "
                            f"name; got {type(attention).__name__} {attention!r}")
        if attention == "relative":
            if mechanism_kwargs:
                raise ValueError(f"{w}: mechanism_kwargs {mechanism_kwargs!r} have no "
                                 f"mechanism to go to with attention='relative'")
            mechanism_kwargs = {}
        else:
            attention, mechanism_kwargs = check_mechanism(w, "attention", attention,
                                                          mechanism_kwargs)
        self.config = {"vocab_size": vocab_size, "attention": attention,
                       "mechanism_kwargs": mechanism_kwargs, "d_model": d_model,
                       "num_heads": num_heads, "num_layers": num_layers, "d_ff": d_ff,
                       "dropout": dropout, "max_len": max_len, "mem_len": mem_len,
                       "rope_base": rope_base}
        self.vocab_size, self.max_len, self.mem_len = vocab_size, max_len, mem_len
        self.d_model, self.attention = d_model, attention
        self.embed = TokenEmbedding(vocab_size, d_model, "none", max_len, dropout)

        def make_attention() -> nn.Module:
            if attention == "relative":
                return RelativeAttention(d_model, num_heads)
            return RotaryMemoryAttention(d_model, num_heads, attention, mechanism_kwargs,
                                         max_len, rope_base)

        self.layers = nn.ModuleList(XLBlock(d_model, make_attention(), d_ff or 4 * d_model,
                                            dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def _check_mems(self, mems, ids: torch.Tensor) -> int:
        """The memory length ``M`` of ``mems`` (0 for ``None``), checked against ``ids``."""
        if mems is None:
            return 0
        if not isinstance(mems, (list, tuple)) or len(mems) != len(self.layers):
            got = f"{len(mems)} items" if isinstance(mems, (list, tuple)) else type(mems).__name__
            raise ValueError(f"{_WHO}: mems must be None or a list of one (B, M, d_model) "
                             f"tensor per layer ({len(self.layers)}); got {got}")
        want = self.embed.weight
        for i, m in enumerate(mems):
            if not isinstance(m, torch.Tensor) or m.dim() != 3 or \
                    m.shape[0] != ids.shape[0] or m.shape[2] != self.d_model or \
                    m.shape[1] != mems[0].shape[1]:
                shape = format_shape(m) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"{_WHO}: mems[{i}] must be ({ids.shape[0]}, M, "
                                 f"{self.d_model}) with the same M for every layer; got {shape}")
            if m.dtype != want.dtype or m.device != want.device:
                raise TypeError(f"{_WHO}: mems[{i}] must be {want.dtype} on {want.device} "
                                f"like the model; got {m.dtype} on {m.device}")
        return mems[0].shape[1]

    def forward(self, ids: torch.Tensor, mems: list[torch.Tensor] | None = None, *,
                mem_len: int | None = None, num_logits: int | None = None):
        check_ids(_WHO, "ids", ids, self.vocab_size, None)
        check_int("num_logits", num_logits, high=ids.shape[1], nullable=True, who=_WHO)
        mem_len = self.mem_len if mem_len is None else check_int("mem_len", mem_len, low=0,
                                                                 who=_WHO)
        m = self._check_mems(mems, ids)
        if m + ids.shape[1] > self.max_len:
            raise ValueError(f"{_WHO}: memory {m} + segment {ids.shape[1]} positions exceed "
                             f"max_len={self.max_len}")
        h = self.embed(ids)
        new_mems = []
        for i, layer in enumerate(self.layers):
            memory = None if mems is None else mems[i]
            new_mems.append(_keep_last(memory, h, mem_len))
            h = layer(h, memory)
        h = self.norm(h if num_logits is None else h[:, h.shape[1] - num_logits:])
        return F.linear(h, self.embed.weight), new_mems  # tied output layer


def _keep_last(memory: torch.Tensor | None, h: torch.Tensor, mem_len: int) -> torch.Tensor:
    """The last ``mem_len`` positions of ``[memory; h]``, detached (the paper's SG)."""
    with torch.no_grad():
        states = h if memory is None else torch.cat([memory, h], dim=1)
        return states[:, states.shape[1] - min(mem_len, states.shape[1]):].detach()
