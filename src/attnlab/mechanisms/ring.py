"""Ring attention: exact attention over a sequence sharded across processes (Liu et al. 2023).

Each of the ``P`` ranks of a ``torch.distributed`` process group holds ``n = N / P`` tokens
of ``Q, K, V`` (its shard, in one of the layouts of :mod:`attnlab.mechanisms._engines.ring`)
and calls the module on them: ``q, k, v`` are ``(B, H, n, D)`` and so is the output, this
rank's rows of the attention over the whole sequence. Key/value blocks travel around the
ring while each rank computes with the block in hand (Blockwise Parallel Transformer, Liu &
Abbeel 2023). For query block ``Q_i`` and the key/value blocks ``K_j, V_j`` it meets:

.. math::

    S_{ij} = \\tau\\, Q_i K_j^\\top, \\qquad
    m_{ij} = \\mathrm{rowmax}\\, S_{ij}, \\qquad
    l_{ij} = \\mathrm{rowsum}\\, e^{S_{ij} - m_{ij}}, \\qquad
    a_{ij} = e^{S_{ij} - m_{ij}} V_j

combined, in any order of ``j`` (so blocks may arrive around the ring), as

.. math::

    m_i = \\max_j m_{ij}, \\qquad
    O_i = \\frac{\\sum_j e^{m_{ij} - m_i}\\, a_{ij}}{\\sum_j e^{m_{ij} - m_i}\\, l_{ij}}
        = \\mathrm{softmax}(\\tau\\, Q_i K^\\top)\\, V

kept as a running ``(m, l, acc)`` per row. Under ``is_causal`` the mask uses the tokens'
global positions and blocks the mask removes entirely are skipped; ``layout`` chooses how
the sequence is cut (``zigzag`` and ``striped`` balance causal work; ``contiguous`` does
not). The backward pass recomputes each block from the saved log-sum-exp ``L_i = m_i + log
l_i`` and sends ``dK, dV`` accumulators around the ring with the blocks.

**Process group**: ``mech.process_group = pg`` (any group of the ranks holding the
shards); left ``None``, it is ``torch.distributed.group.WORLD`` when a default group is
initialised, else there is none. Without one (or with ``P = 1``) the module is blockwise
exact attention over its inputs, equal to ``sdpa``/``flash``. Every rank must call it with
the same shapes, flags and hyperparameters (each rank's shard has the same length).
gloo on CPU, nccl on CUDA: the same code. ``mech.stats`` (:class:`RingStats`) counts the
tiles computed and skipped and times the waits on transfers against the compute.

**ALiBi** (``alibi=True``; Press et al. 2022): the bias ``-m_h (i - j)`` is added to every
tile at the tokens' *global* positions, which each rank knows from the layout, so a
sharded sequence is biased as the whole one would be (a model's ``positions="alibi"``
builds a dense mask instead, which ring does not take: use ``positions="none"`` with it).

Refused: dropout (``dropout_p > 0``: a ``ValueError``; each rank would need the same mask
stream for the tiles it does not own), masks other than key padding (a ``(B, H, 1, n)``
bool mask of this rank's keys, which travels with them), ``Nq != Nk``.
"""

from __future__ import annotations

import torch.distributed as dist

from attnlab.mechanisms._engines.ring import (
    LAYOUTS,
    RingAttentionFunction,
    RingStats,
    check_length,
    positions,
    shard,
    unshard,
)
from attnlab.mechanisms.base import Mechanism, key_padding_keep
from attnlab.nn.positional import alibi_slopes
from attnlab.registry import HParam, Limit, Paper, register_mechanism

__all__ = ["LIU_2023", "BRANDON_2023", "RingAttention", "RingStats", "default_group",
           "positions", "shard", "unshard"]

LIU_2023 = Paper(
    "Ring Attention with Blockwise Transformers for Near-Infinite Context",
    "Hao Liu, Matei Zaharia, Pieter Abbeel",
    2023,
    "https://arxiv.org/abs/2310.01889",
)
BRANDON_2023 = Paper(
    "Striped Attention: Faster Ring Attention for Causal Transformers",
    "William Brandon, Aniruddha Nrusimha, Kevin Qian, Zachary Ankner, Tian Jin, Zhiye Song, "
    "Jonathan Ragan-Kelley",
    2023,
    "https://arxiv.org/abs/2311.09431",
)


def default_group():
    """``dist.group.WORLD`` when a default process group is initialised, else ``None``."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


@register_mechanism(
    "ring",
    family="ring",
    paper=LIU_2023,
    time="O(N^2 D / P) per rank (causal: half, balanced by zigzag / striped)",
    memory="O(N / P) per rank",
    equation="O_i = sum_j e^{m_ij - m_i} e^{S_ij - m_ij} V_j / sum_j e^{m_ij - m_i} l_ij, "
             "S_ij = tau Q_i K_j^T, K_j V_j passed around a ring of P ranks",
    exact=True, causal=True, arbitrary_mask=False, key_padding=True, cross=False,
    returns_weights=False, half_precision=True,
    aliases=("ring_attention", "context_parallel"),
    limit=Limit(hparams=lambda n: {}, note="exact: softmax attention (one process: blockwise)"),
    tiny_hparams={"block_size": 4},
    hparams=[
        HParam("layout", str, "zigzag", "how the sequence is cut over the ranks",
               choices=LAYOUTS),
        HParam("block_size", int, 256, "query and key rows per tile", low=1),
        HParam("alibi", bool, False, "ALiBi (Press et al. 2022) inside the ring: -m_h (i - j) "
               "at the tokens' global positions (non-causal: -m_h |i - j|), slopes "
               "alibi_slopes(H)"),
    ],
)
class RingAttention(Mechanism):
    """Ring attention: exact attention over a sequence sharded across a process group."""

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.process_group = None  # None: dist.group.WORLD when initialised
        self.stats = RingStats()

    def group(self):
        """The process group the shards are spread over (``None``: this process alone)."""
        return default_group() if self.process_group is None else self.process_group

    def world(self) -> tuple[int, int]:
        """``(rank, P)`` of this process in :meth:`group` (``(0, 1)`` without one)."""
        g = self.group()
        return (0, 1) if g is None else (dist.get_rank(g), dist.get_world_size(g))

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        if dropout_p > 0:
            raise ValueError(f"ring: dropout_p must be 0 (attention dropout is not supported "
                             f"across ranks); got {dropout_p}")
        _, P = self.world()
        check_length(q.shape[2] * P, self.hp["layout"], P)
        keep = key_padding_keep(attn_mask, q.shape[0], q.shape[1], k.shape[2])
        slopes = alibi_slopes(q.shape[1]).to(q.device) if self.hp["alibi"] else None
        out = RingAttentionFunction.apply(q, k, v, None if keep is None else keep.contiguous(),
                                          is_causal, scale, self.hp["layout"],
                                          self.hp["block_size"], self.group(), self.stats,
                                          slopes)
        return out, None
