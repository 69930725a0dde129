"""Reformer's LSH attention, of the hashing family (Sparse Sinkhorn attention, the other
member, is in :mod:`attnlab.mechanisms.hashing.sinkhorn`).

It sorts the sequence so that, after sorting, a *local* attention pattern (chunks of
fixed size) reaches the keys that matter, and never forms ``N x N`` scores.

**reformer** (Kitaev et al. 2020). Angular LSH with a random rotation ``R`` (``D x n_b/2``):

.. math::

    h(x) = \\arg\\max([xR;\\ -xR]), \\qquad
    o_i = \\sum_{j \\in \\tilde P_i} \\exp\\big(q_i \\cdot k_j - m(j, P_i) - z(i, P_i)\\big) v_j

with ``P_i = {j : h(q_i) = h(k_j)}`` (same bucket), ``m(j, P_i) = inf`` for ``j not in P_i``
and ``\\tilde P_i`` the chunk of ``q_i`` and the previous chunk after sorting by
``(bucket, position)``. Shared-QK attention uses ``k_j = q_j / ||q_j||`` and replaces the
score of ``q_i`` with itself by a large negative constant (it wins only when alone).
``n_hashes`` rounds ``r`` combine as in eqs. 6-7 of the paper:

.. math::

    o_i = \\sum_r \\exp\\big(z(i, P_i^{(r)}) - z(i, P_i)\\big)\\, o_i^{(r)}, \\qquad
    m^{(r)}_{ij} = \\ln N_{ij}, \\ N_{ij} = |\\{r' : j \\in P_i^{(r')}\\}|,

i.e. exactly softmax attention over the union of the rounds' key sets. Causal (shared QK):
``j <= i`` in ``i``'s bucket and at most ``b`` sorted places back, a set that depends on
tokens ``<= i`` only (chunk boundaries would let future tokens' hashes move it).

"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnlab.contract import work_dtype
from attnlab.mechanisms.base import Mechanism, by_heads, key_padding_keep
from attnlab.registry import HParam, Limit, Paper, register_mechanism
from attnlab.verify import causal_allowed, dense_softmax_f64

__all__ = ["ReformerAttention"]

KITAEV_2020 = Paper(
    "Reformer: The Efficient Transformer",
    "Nikita Kitaev, Lukasz Kaiser, Anselm Levskaya",
    2020,
    "https://arxiv.org/abs/2001.04451",
)
_INF = float("inf")
# Score given to a query with itself under shared QK: finite, so a query with no other key
# still attends itself, but far below any real score (the paper's "large negative value").
SELF_SCORE = -1e9
_GOLDEN = 0x9E3779B97F4A7C15


def group_size(name: str, hp: str, size: int, n: int) -> int:
    """Tokens per chunk/block for a sequence of ``n``: ``size``, or ``n`` if ``n <= size``."""
    if n <= size:
        return n  # one chunk/block holds the whole sequence (a short input is not an error)
    if n % size:
        raise ValueError(
            f"{name}: {hp}={size} does not divide the sequence length N={n} ({hp} not "
            f"dividing N); pad N to a multiple of {size} or pick a {hp} that divides {n}"
        )
    return size


def _safe_softmax(scores: torch.Tensor):
    """``(softmax, logsumexp)`` over the last dim; rows with no allowed key give ``p = 0`` and
    ``lse = -inf`` with finite gradients (no ``exp(-inf - -inf)``)."""
    m = scores.detach().amax(dim=-1, keepdim=True)
    m = m.masked_fill(torch.isneginf(m), 0.0)  # the max only stabilises; it cancels out
    e = torch.exp(scores - m)
    s = e.sum(dim=-1, keepdim=True)
    alive = s > 0
    s_safe = torch.where(alive, s, torch.ones_like(s))
    lse = torch.where(alive, m + torch.log(s_safe), torch.full_like(s, -_INF))
    return e / s_safe, lse.squeeze(-1)


def _look_one_back(x: torch.Tensor, n_chunks: int, chunk_dim: int) -> torch.Tensor:
    """Each chunk (along ``chunk_dim``, items along the next dim) preceded by the previous
    one; chunk 0 by the last, as in the reference code. One chunk is its own previous one:
    keep it once, so that no key is counted twice."""
    if n_chunks == 1:
        return x
    return torch.cat([x.roll(1, dims=chunk_dim), x], dim=chunk_dim + 1)


def reformer_reference(q, k, v, *, mech, scale, is_causal):
    """Shared-QK attention over the whole sequence, in float64: what LSH attention is with
    one bucket. Keys ``k_j = q_j / |q_j|`` (the ``k`` given is ignored); with ``mask_self``
    a query attends itself only when no other key is allowed (the paper's rule)."""
    n = q.shape[-2]
    keys = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    scores = q @ keys.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    allowed = causal_allowed(n, n) if is_causal else torch.ones(n, n, dtype=torch.bool)
    mask_self = mech.hp["mask_self"]
    if mask_self if mask_self is not None else mech.hp["shared_qk"]:
        eye = torch.eye(n, dtype=torch.bool)
        others = allowed & ~eye
        allowed = others | (eye & ~others.any(dim=-1, keepdim=True))
    return dense_softmax_f64(scores, v, allowed)


@register_mechanism(
    "reformer",
    family="hashing",
    paper=KITAEV_2020,
    time="O(r N b (D + r)),  r = n_hashes, b = bucket_size",
    memory="O(r N (b + D))",
    equation="o_i = sum_{j in P~_i, h(q_i)=h(k_j)} exp(q_i.k_j - z(i, P_i)) v_j, "
             "h(x) = argmax([xR; -xR]); rounds: o_i = sum_r exp(z(i,P_i^(r)) - z(i,P_i)) o_i^(r)",
    exact=False, causal=True, arbitrary_mask=False, key_padding=True, cross=False,
    returns_weights=False, half_precision=True, learnable=False,
    aliases=("lsh", "lsh_attention"),
    hparams=[
        HParam("bucket_size", int, 64, "chunk size b; n_buckets = N // b (N <= b: one chunk)",
               low=1),
        HParam("n_hashes", int, 2, "hash rounds r, combined by log-sum-exp weights", low=1),
        HParam("shared_qk", bool, True, "keys = q / ||q|| (k is ignored), as in the paper"),
        HParam("mask_self", bool, None, "a query does not attend itself unless alone "
               "(None = same as shared_qk)", nullable=True),
        HParam("fixed_rotations", bool, False, "same rotations every call (from seed); "
               "False draws fresh ones each call, as the paper"),
        HParam("seed", int, 0, "seed of the random rotations", low=0),
    ],
    tiny_hparams={"bucket_size": 4, "n_hashes": 2},
    # One chunk holds the sequence, so every round hashes nothing away (the user's n_hashes
    # rounds stay and must combine to the same result). Shared QK, the paper's form, is
    # kept rather than separate keys: it is the only one with a causal form to check.
    limit=Limit(hparams=lambda n: {"bucket_size": n, "shared_qk": True},
                note="bucket_size = N (one bucket): shared-QK softmax attention",
                reference=reformer_reference),
)
class ReformerAttention(Mechanism):
    """Reformer LSH attention: sort by angular-LSH bucket, attend within chunks.

    ``o_i = sum_{j in P~_i} exp(q_i.k_j - m(j, P_i) - z(i, P_i)) v_j`` with ``h(x) =
    argmax([xR; -xR])``. Per round the tokens are sorted by ``(h, position)`` and cut into
    chunks of ``b = bucket_size``; a query sees keys of *its own bucket* in its chunk and
    the previous one (``m(j, P_i)`` of eq. 3; no chunk is counted twice when there is only
    one). ``n_buckets = N // b`` (rounded up to even for the hash, as ``h`` needs pairs of
    directions); ``N`` must be a multiple of ``b`` (``N <= b`` is one chunk: exact).

    * ``shared_qk=True`` (default, the paper): keys are ``q_j / ||q_j||``; the ``k`` given
      is ignored. ``mask_self`` then scores ``q_i`` with itself at ``SELF_SCORE``.
    * ``shared_qk=False``: queries and keys are hashed and sorted separately; query chunk
      ``n`` meets key chunks ``n`` and ``n - 1`` (why the paper shares QK: these need not
      hold the same buckets). A query with no key of its bucket there outputs zeros.
    * Rounds combine by eqs. 6-7 with the ``ln N_ij`` correction, so ``r`` rounds are exact
      softmax attention over the union of their key sets.
    * Causal (shared QK only): query ``i`` sees ``j <= i`` of its bucket at most ``b``
      places before it in sorted order. Within a bucket sorted distance is rank distance,
      which depends on tokens ``<= i`` only; the paper's chunk boundaries would let future
      tokens' hashes change which past keys a query sees.
    * Rotations (``H x r x D x n_b/2``, one per head and round) come from a generator
      seeded by ``seed`` (``fixed_rotations``) or by ``seed`` and a call counter.
    * Key padding (bool ``(B, H, 1, N)``, ``False`` = padded): padded keys are masked
      inside the chunks, after the own-position score (reformer_pytorch masks its
      ``input_mask`` there too), so no query attends them; rows left with no key give zeros.
      A padded position is, besides, hashed to a bucket of its own, after every real one
      (for queries too: Reformer is self-attention, and a padded position's query row is
      padding): its content cannot move real tokens between chunks, so real rows do not
      depend on it. Padded values are zeroed. With one chunk (``N <= bucket_size``) this
      is exact masked (shared-QK) softmax attention; with more, the chunks are laid over
      the real tokens' sort only, which differs from the unpadded run's hashing.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self._calls = 0

    def rotations(self, H: int, D: int, n_chunks: int, device, dtype) -> torch.Tensor:
        """The random rotations ``(H, n_hashes, D, n_buckets / 2)`` for the next call."""
        n_rot = (n_chunks + 1) // 2
        seed = self.hp["seed"]
        if not self.hp["fixed_rotations"]:
            seed = (seed + self._calls * _GOLDEN) % 2**63
            self._calls += 1
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (H, self.hp["n_hashes"], D, n_rot)
        return torch.randn(shape, generator=g, device=device, dtype=dtype)

    def _sort(self, x: torch.Tensor, rot: torch.Tensor | None, keep: torch.Tensor | None):
        """Buckets, sorted order (slot -> token) and its inverse (token -> slot), each
        ``(B, H, r, N)``: tokens sorted by (bucket, position) in every round; padded
        tokens (``keep`` False) in a last bucket of their own."""
        B, H, N, _ = x.shape
        r = self.hp["n_hashes"]
        pos = torch.arange(N, device=x.device)
        if rot is None:  # one chunk: hashing cannot change who meets whom; skip it
            order = pos.expand(B, H, r, N)
            return torch.zeros_like(order), order, order
        with torch.no_grad():
            xr = torch.einsum("bhnd,hrdk->bhrnk", x, rot)
            # argmax([xR; -xR]) without building it: the larger of max(xR) and -min(xR).
            # Ties go to the first half, as argmax over the concatenation would.
            hi, i_hi = xr.max(dim=-1)
            lo, i_lo = xr.min(dim=-1)
            buckets = torch.where(hi >= -lo, i_hi, i_lo + xr.shape[-1])
            if keep is not None:  # bucket 2 * (n_b / 2): after every real one
                buckets = buckets.masked_fill(~keep.unsqueeze(2), 2 * xr.shape[-1])
            order = (buckets * N + pos).argsort(dim=-1)
            inv = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order))
        return buckets, order, inv

    @staticmethod
    def _codes(buckets, order, inv, c, nc, causal, query):
        """Per round and token, ``(B, H, r, N)`` int32 codes that make membership two
        comparisons of small per-token values (never index arithmetic on the scores' shape).

        Causal: key ``j`` is in the set of query ``i`` iff ``lo_i <= s_j <= s_i``, with ``s``
        the sorted slot and ``lo_i = max(s_i - c, first slot of i's bucket)``. Otherwise:
        iff ``code_j`` is ``bucket_i * nc + chunk_i`` or ``bucket_i * nc + chunk_i - 1``.
        """
        if causal:
            if not query:
                return (inv.int(),)
            sb = buckets.gather(-1, order)  # buckets in sorted order: runs
            slot = torch.arange(sb.shape[-1], device=sb.device).expand_as(sb)
            first = torch.ones_like(sb, dtype=torch.bool)
            first[..., 1:] = sb[..., 1:] != sb[..., :-1]
            start = torch.where(first, slot, 0).cummax(dim=-1).values.gather(-1, inv)
            return torch.maximum(inv - c, start).int(), inv.int()
        chunk = torch.div(inv, c, rounding_mode="floor")
        if not query:
            return ((buckets * nc + chunk).int(),)
        return (buckets * nc + chunk).int(), (buckets * nc + (chunk - 1) % nc).int()

    def _bias(self, qc, kc, tq, tk, causal, work):
        """Additive ``(B, H, r, nc, c, L)`` term of eqs. 3 and 7: ``-inf`` where key ``j``
        is outside ``P_i`` in the slot's own round, else ``-ln N_ij`` (0 with one round)."""
        r = self.hp["n_hashes"]
        count, blocked = None, None
        for rp in range(r):  # who meets whom under round rp's hash, at every round's slots
            def at(t, idx, rp=rp):  # round-rp values at token ids idx
                return t[:, :, rp].gather(-1, idx.flatten(2)).view(idx.shape)
            a, b = (at(t, tq).unsqueeze(-1) for t in qc)
            kj = at(kc, tk).unsqueeze(-2)
            inside = (torch.ge(kj, a).logical_and_(torch.le(kj, b)) if causal
                      else torch.eq(kj, a).logical_or_(torch.eq(kj, b)))
            if blocked is None:
                blocked = torch.empty_like(inside)
            blocked[:, :, rp] = inside[:, :, rp]
            if r > 1:  # N_ij: rounds whose set holds j
                count = inside.to(torch.uint8) if count is None else count.add_(inside)
        blocked.logical_not_()
        if count is None:
            return torch.zeros(blocked.shape, dtype=work, device=blocked.device).masked_fill_(
                blocked, -_INF)
        # count >= 1 wherever the pair is allowed; the clamp only keeps log finite elsewhere.
        return count.clamp_min_(1).to(work).log_().neg_().masked_fill_(blocked, -_INF)

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        B, H, N, D = q.shape
        if is_causal and not self.hp["shared_qk"]:
            raise ValueError("reformer: is_causal=True needs shared_qk=True (with separate "
                             "query and key hashes, future tokens would move past keys in "
                             "and out of a query's chunks); got shared_qk=False")
        c = group_size("reformer", "bucket_size", self.hp["bucket_size"], N)
        nc, r = N // c, self.hp["n_hashes"]
        # One draw per call (the counter advances once), then a few heads at a time: each
        # head's (r, N, L) scores, bias and weights, not all H heads', set the peak.
        rot = None if nc == 1 else self.rotations(H, D, nc, q.device, work_dtype(q.dtype))

        def heads(q, k, v, mask, s):
            return self._attend_heads(q, k, v, mask, is_causal, scale, dropout_p, c,
                                      None if rot is None else rot[s])

        return by_heads(heads, q, k, v, attn_mask, r * N * (c if nc == 1 else 2 * c)), None

    def _attend_heads(self, q, k, v, attn_mask, is_causal, scale, dropout_p, c, rot):
        """LSH attention of these heads with their rotations ``rot`` (None: one chunk)."""
        B, H, N, D = q.shape
        r, shared = self.hp["n_hashes"], self.hp["shared_qk"]
        mask_self = shared if self.hp["mask_self"] is None else self.hp["mask_self"]
        nc = N // c
        L = c if nc == 1 else 2 * c
        dtype = q.dtype
        work = work_dtype(dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        if shared:
            k = q / q.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(work).tiny)
        keep = key_padding_keep(attn_mask, B, H, N)
        if keep is not None:  # finite padding content then meets only zero weights
            v = v.masked_fill(~keep.unsqueeze(-1), 0.0)
        bq, order_q, inv_q = self._sort(q, rot, keep)
        bk, order_k, inv_k = (bq, order_q, inv_q) if shared else self._sort(k, rot, keep)
        # Flat row numbers of the sorted tokens: index_select on (B*H*N, E) rows. Keys and
        # values are gathered straight into the look-one-back layout (no sort, then concat).
        base = (torch.arange(B * H, device=q.device) * N).view(B, H, 1, 1)
        rows_q = (order_q + base).flatten()
        rows_k = _look_one_back((order_k + base).view(B, H, r, nc, c), nc, 3).flatten()

        def gather(x, rows, length):  # (B, H, N, E) -> (B, H, r, nc, length, E)
            return x.reshape(B * H * N, -1).index_select(0, rows).view(B, H, r, nc, length, -1)

        tq = order_q.reshape(B, H, r, nc, c)  # token id of each query slot
        tk = _look_one_back(order_k.reshape(B, H, r, nc, c), nc, 3)  # (B, H, r, nc, L)
        k_s, v_s = gather(k, rows_k, L), gather(v, rows_k, L)
        q_s = gather(q * scale, rows_q, c)  # scale on (N, D), not on the (N, L) scores

        qc = self._codes(bq, order_q, inv_q, c, nc, is_causal, query=True)
        kc = self._codes(bk, order_k, inv_k, c, nc, is_causal, query=False)[0]
        bias = self._bias(qc, kc, tq, tk, is_causal, work)  # -inf outside, -ln N_ij inside
        # scores = bias + q k^T in one GEMM pass (baddbmm adds the bias as it writes).
        scores = torch.baddbmm(bias.view(-1, c, L), q_s.reshape(-1, c, D),
                               k_s.reshape(-1, L, D).transpose(1, 2)).view(bias.shape)
        if mask_self:
            if shared:  # same sort for q and k: itself sits at a fixed place in the chunk
                t = torch.arange(c, device=q.device)
                self_pair = torch.zeros(c, L, dtype=torch.bool, device=q.device)
                self_pair[t, t + (L - c)] = True
            else:
                self_pair = tq.unsqueeze(-1) == tk.unsqueeze(-2)
            scores = scores.masked_fill_(self_pair, SELF_SCORE)
        if keep is not None:  # after the self score: a padded position is never attended
            pad_k = ~keep.unsqueeze(2).expand(B, H, r, N).gather(-1, tk.flatten(3))
            scores = scores.masked_fill_(pad_k.view(tk.shape).unsqueeze(-2), -_INF)
        fused = shared and keep is None  # every row holds its own finite score
        return self._combine(scores, v_s, inv_q, fused, dropout_p).to(dtype)

    def _combine(self, scores, v_s, inv_q, fused: bool, dropout_p: float):
        """Per round, the softmax over each chunk's keys and its outputs back in token
        order; rounds combined by eqs. 6-7: ``(B, H, N, Dv)``."""
        B, H, r, N = inv_q.shape
        Dv = v_s.shape[-1]
        if fused:
            p = torch.softmax(scores, dim=-1)
            lse = None
            if r > 1:  # z = s_m - ln p_m at the row's max m (p_m >= 1/L): no second exp pass
                s_max, i_max = scores.max(dim=-1, keepdim=True)
                lse = (s_max - p.gather(-1, i_max).log()).squeeze(-1)
        else:  # a query may find no key of its bucket (or only padding): a row of -inf
            p, lse = _safe_softmax(scores)
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        o = torch.matmul(p, v_s).view(B * H * r * N, Dv)
        # Undo the sort: slot inv_q[t] of each round holds token t.
        rows_o = (inv_q + torch.arange(B * H * r, device=inv_q.device).view(B, H, r, 1) * N)
        o = o.index_select(0, rows_o.flatten()).view(B, H, r, N, Dv)
        if r == 1:
            return o[:, :, 0]
        lse = lse.view(B, H, r, N).gather(3, inv_q)
        w, _ = _safe_softmax(lse.transpose(2, 3))  # exp(z(i, P^(r)) - z(i, P)), (B, H, N, r)
        return torch.einsum("bhnr,bhrnd->bhnd", w, o)
