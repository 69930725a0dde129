"""Sparse Sinkhorn attention (Tay et al. 2020), of the hashing / clustering family.

Like Reformer (:mod:`attnlab.mechanisms.hashing.reformer`) it sorts the sequence so that a local
pattern (blocks of fixed size) reaches the keys that matter, without ``N x N`` scores.

**sinkhorn** (Tay et al. 2020). Blocks of ``b`` tokens; a meta sorting network ``P`` on
block-pooled keys ``psi_P(K)`` gives block scores ``R``, made doubly stochastic by
log-space Sinkhorn normalisation ``S^k = F_c(F_r(S^{k-1}))``, ``S^0 = R / tau``:

.. math::

    S = \\mathrm{Sinkhorn}(R / \\tau), \\qquad \\psi_S(K)_i = \\sum_j S_{ij} K_j, \\qquad
    Y_i = \\mathrm{softmax}\\big(Q_i [K_i;\\ \\psi_S(K)_i]^\\top\\big) [V_i;\\ \\psi_S(V)_i]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import masked_softmax, work_dtype
from attnlab.mechanisms.base import Mechanism, by_heads, key_padding_keep
from attnlab.mechanisms.hashing.reformer import group_size
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism
from attnlab.verify import dense_softmax_f64, param_f64

__all__ = ["SinkhornAttention", "padded_sorting", "sinkhorn_log", "sinkhorn_normalise"]

TAY_2020 = Paper(
    "Sparse Sinkhorn Attention",
    "Yi Tay, Dara Bahri, Liu Yang, Donald Metzler, Da-Cheng Juan",
    2020,
    "https://arxiv.org/abs/2002.11296",
)

def sinkhorn_log(log_r: torch.Tensor, iters: int) -> torch.Tensor:
    """Log-space Sinkhorn: ``iters`` rounds of row then column normalisation of
    ``exp(log_r)`` (the paper's ``F_c(F_r(.))``); returns ``log S``."""
    for _ in range(iters):
        log_r = log_r - torch.logsumexp(log_r, dim=-1, keepdim=True)
        log_r = log_r - torch.logsumexp(log_r, dim=-2, keepdim=True)
    return log_r


def sinkhorn_normalise(log_r: torch.Tensor, iters: int) -> torch.Tensor:
    """``S = exp(sinkhorn_log(log_r, iters))`` (rows and columns sum to ~1)."""
    return sinkhorn_log(log_r, iters).exp()


def padded_sorting(log_s: torch.Tensor, keep: torch.Tensor):
    """Mixing weights of the sorted blocks under key padding, and which slots hold a key.

    ``log_s`` ``(B, H, nb, nb)`` is ``log S``; ``keep`` ``(B, H, nb, b)`` marks the real
    keys. Slot ``t`` of sorted block ``i`` mixes the keys at offset ``t`` of every block
    ``j``: here with weights ``S_ij`` renormalised over the *real* ones, ``w_itj = S_ij
    keep_jt / sum_j' S_ij' keep_j't`` (a softmax of ``log S_ij`` over the real ``j``).
    Weighting by ``S_ij`` alone would give the real keys a total weight below 1 next to
    zeroed padding: the slot's key and value shrink towards 0 and the output with them.
    Returns ``w`` ``(B, H, nb, b, nb)`` (zeros for a slot with no real key) and
    ``alive`` ``(B, H, 1, 1, b)``, False for such a slot, which must then be masked out.
    """
    B, H, nb, b = keep.shape
    allowed = keep.transpose(-1, -2).unsqueeze(2)                      # (B, H, 1, b, nb)
    w = masked_softmax(log_s.unsqueeze(-2).expand(B, H, nb, b, nb), allowed)
    return w, keep.any(dim=2).view(B, H, 1, 1, b)


def _sinkhorn_limit(n: int) -> dict:
    """4 (or 3, or 2) blocks when they divide N, so the sorting network is exercised."""
    blocks = next((p for p in (4, 3, 2) if n % p == 0), 1)
    return {"block_size": n // blocks}


def sinkhorn_reference(q, k, v, *, mech, scale, is_causal):
    """Tay et al.'s local + sorted block attention in float64, block by block, from the
    module's sorting network: ``R_ij = P(psi(K)_i) . psi(K)_j / sqrt(D)``, ``S =
    Sinkhorn(R / tau)``, block ``i`` attends ``[K_i; sum_j S_ij K_j]`` (only ``K_i`` when
    there is one block)."""
    N, D = q.shape[-2:]
    b = min(mech.hp["block_size"], N)
    nb = N // b
    scale = D ** -0.5 if scale is None else scale
    if nb == 1:
        return dense_softmax_f64(q @ k.transpose(-2, -1) * scale, v)
    blocks = [slice(j * b, (j + 1) * b) for j in range(nb)]
    pooled = torch.stack([k[..., s, :].mean(dim=-2) for s in blocks], dim=-2)  # (B, H, nb, D)
    w1, b1, w2 = (param_f64(p) for p in (mech.sort_in.weight, mech.sort_in.bias,
                                         mech.sort_out.weight))
    log_s = torch.relu(pooled @ w1.T + b1) @ w2.T @ pooled.transpose(-2, -1) / math.sqrt(D)
    log_s = log_s / mech.hp["temperature"]
    for _ in range(mech.hp["sinkhorn_iters"]):  # rows, then columns, sum to 1
        log_s = log_s - torch.logsumexp(log_s, dim=-1, keepdim=True)
        log_s = log_s - torch.logsumexp(log_s, dim=-2, keepdim=True)
    S = log_s.exp()
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for i, rows in enumerate(blocks):
        k_sorted = sum(S[..., i, j, None, None] * k[..., s, :] for j, s in enumerate(blocks))
        v_sorted = sum(S[..., i, j, None, None] * v[..., s, :] for j, s in enumerate(blocks))
        keys = torch.cat([k[..., rows, :], k_sorted], dim=-2)
        values = torch.cat([v[..., rows, :], v_sorted], dim=-2)
        out[..., rows, :] = dense_softmax_f64(q[..., rows, :] @ keys.transpose(-2, -1) * scale,
                                              values)
    return out


@register_mechanism(
    "sinkhorn",
    family="hashing",
    paper=TAY_2020,
    time="O(N b D + N^2 D / b),  b = block_size",
    memory="O(N b + N D + (N/b)^2)",
    equation="Y_i = softmax(Q_i [K_i; psi_S(K)_i]^T) [V_i; psi_S(V)_i], "
             "psi_S(X)_i = sum_j S_ij X_j, S = Sinkhorn(R / tau), R = P(psi_P(K))",
    exact=False, causal=False, arbitrary_mask=False, key_padding=True, cross=False,
    returns_weights=False, half_precision=True, learnable=True,
    aliases=("sparse_sinkhorn", "sinkhorn_attention"),
    hparams=[
        HParam("head_dim", int, REQUIRED, "size D of each query/key head", low=1),
        HParam("block_size", int, 64, "block size b; N_B = N // b blocks (N <= b: one block)",
               low=1),
        HParam("sinkhorn_iters", int, 8, "Sinkhorn row/column normalisation rounds", low=1),
        HParam("temperature", float, 0.75, "tau: S = Sinkhorn(R / tau)", low=0.0,
               low_exclusive=True),
    ],
    tiny_hparams={"block_size": 4},
    # One block (block_size >= N) would be plain softmax attention and check none of the
    # sorting; the paper's own formula, with several blocks, checks all of it.
    limit=Limit(hparams=_sinkhorn_limit, reference=sinkhorn_reference,
                note="4 blocks (when 4 | N): its own formula (local + Sinkhorn-sorted block)"),
)
class SinkhornAttention(Mechanism):
    """Sparse Sinkhorn attention: each block attends to itself and a soft-sorted key block.

    The sequence is cut into ``N_B = N / b`` blocks. The meta sorting network ``P`` scores
    block pairs from block-pooled keys ``psi_P(K)_i`` (mean of the block's keys):
    ``R_ij = P(psi_P(K)_i) . psi_P(K)_j / sqrt(D)``, ``P(x) = W_2 relu(W_1 x + b_1)``,
    and ``S = Sinkhorn(R / tau)`` (``sinkhorn_iters`` log-space rounds) is a soft block
    permutation. The sorted keys/values are ``psi_S(K)_i = sum_j S_ij K_j``; block ``i``'s
    queries attend ``[K_i; psi_S(K)_i]`` (``2b`` keys), as in the paper's local + sorted
    attention. With one block the sorted block *is* the block (``S = [1]``): it is kept
    once, which makes ``N <= b`` exact attention.

    Departures from the paper, each because its form needs a fixed length or input:
    ``P`` scores pairs (bilinear) instead of emitting ``N_B`` logits from a ``d x N_B``
    weight, so any ``N`` works; pooling is the mean (the paper's sum scaled by ``1/b``);
    no Gumbel noise (deterministic); the network acts on the per-head keys with one set of
    weights shared by all heads. No causal form (the paper's causal Sinkhorn balancing is
    not implemented), no arbitrary masks, self-attention only.

    Key padding (bool ``(B, H, 1, N)``, ``False`` = padded; the paper has none): padded
    keys and values are zeroed before the block pooling and the sorting, so they add
    nothing to ``psi_P(K)``, and padded keys are masked out of each block's local part.
    In the sorted blocks a padded key gets weight 0 after the balancing: slot ``t`` of
    sorted block ``i`` mixes the real keys at offset ``t`` with ``S_ij`` renormalised over
    them (:func:`padded_sorting`), and a slot with no real key is masked out. Every output
    row is then a convex combination of real values (one real key gives its value to every
    query); padding content never reaches the output. With one block this is masked
    softmax attention; with several, the blocks (and their means, which count the zeroed
    padding) are laid over all ``N`` positions, so the result is not the one on the
    unpadded sequence.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        d = self.hp["head_dim"]
        self.sort_in = nn.Linear(d, d)
        # No output bias: it would add a per-column constant to R, which Sinkhorn's column
        # normalisation removes (a parameter that never gets a gradient).
        self.sort_out = nn.Linear(d, d, bias=False)

    def _blocks(self, q):
        N = q.shape[-2]
        if q.shape[-1] != self.hp["head_dim"]:
            raise ValueError(
                f"sinkhorn: q head dim {q.shape[-1]} does not match head_dim="
                f"{self.hp['head_dim']} the module was built with; create it with "
                f"head_dim={q.shape[-1]}"
            )
        b = group_size("sinkhorn", "block_size", self.hp["block_size"], N)
        return b, N // b

    def sorting_matrix(self, k: torch.Tensor) -> torch.Tensor:
        """The doubly stochastic block matrix ``S`` ``(B, H, N_B, N_B)`` for keys ``k``."""
        return self.log_sorting_matrix(k).exp()

    def log_sorting_matrix(self, k: torch.Tensor) -> torch.Tensor:
        """``log S`` (see :meth:`sorting_matrix`), in the work dtype."""
        b, nb = self._blocks(k)
        B, H, N, D = k.shape
        work = work_dtype(k.dtype)
        pooled = k.to(work).view(B, H, nb, b, D).mean(dim=3)  # psi_P(K)
        w1, b1, w2 = (t.to(work) for t in (self.sort_in.weight, self.sort_in.bias,
                                           self.sort_out.weight))
        f = F.linear(F.relu(F.linear(pooled, w1, b1)), w2)
        r = torch.matmul(f, pooled.transpose(-1, -2)) / math.sqrt(D)
        return sinkhorn_log(r / self.hp["temperature"], self.hp["sinkhorn_iters"])

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        b, _ = self._blocks(q)
        # Heads are independent (the sorting network's weights are shared, its input is
        # per head): a few at a time, so that one slice's (N, 2b) scores and (N, 2D) local
        # + sorted keys and values, not all H heads', set the peak.
        per_head = 2 * q.shape[2] * max(b, q.shape[-1], v.shape[-1])

        def heads(q, k, v, mask, _):
            return self._attend_heads(q, k, v, mask, scale, dropout_p)

        return by_heads(heads, q, k, v, attn_mask, per_head), None

    def _attend_heads(self, q, k, v, attn_mask, scale, dropout_p):
        b, nb = self._blocks(q)
        B, H, N, D = q.shape
        Dv = v.shape[-1]
        dtype = q.dtype
        work = work_dtype(dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        keep = key_padding_keep(attn_mask, B, H, N)
        if keep is not None:  # padding adds nothing to the pooled or the sorted blocks
            k, v = (t.masked_fill(~keep.unsqueeze(-1), 0.0) for t in (k, v))
        qb, kb, vb = q.view(B, H, nb, b, D), k.view(B, H, nb, b, D), v.view(B, H, nb, b, Dv)
        # Which of the block's b (or 2b) keys may be attended: None = all.
        allowed = None if keep is None else keep.reshape(B, H, nb, 1, b)
        if nb > 1:
            log_s = self.log_sorting_matrix(k)  # (B, H, nb, nb): tiny
            if keep is None:
                s = log_s.exp()
                k_sorted = torch.einsum("bhij,bhjtd->bhitd", s, kb)
                v_sorted = torch.einsum("bhij,bhjtd->bhitd", s, vb)
            else:  # padded keys weigh 0 in the sorted slots, real ones sum to 1
                w, alive = padded_sorting(log_s, keep.reshape(B, H, nb, b))
                k_sorted = torch.einsum("bhitj,bhjtd->bhitd", w, kb)
                v_sorted = torch.einsum("bhitj,bhjtd->bhitd", w, vb)
                allowed = torch.cat([allowed, alive.expand(B, H, nb, 1, b)], dim=-1)
            kb = torch.cat([kb, k_sorted], dim=3)  # (B, H, nb, 2b, D)
            vb = torch.cat([vb, v_sorted], dim=3)
        scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale      # (B, H, nb, b, b or 2b)
        p = torch.softmax(scores, dim=-1) if allowed is None else masked_softmax(scores, allowed)
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        out = torch.matmul(p, vb).reshape(B, H, N, Dv)
        return out.to(dtype)
