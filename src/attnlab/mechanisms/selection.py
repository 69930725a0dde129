"""Selection: each query keeps a few keys and gives every other key weight exactly zero.

* ``topk`` -- Zhao et al. 2019, the Explicit Sparse Transformer: the ``k`` largest scores
  of each query survive, softmax over those alone,

  .. math::

      P = \\frac{Q K^\\top}{\\sqrt d}, \\quad
      \\mathcal M(P, k)_{ij} = \\begin{cases} P_{ij} & P_{ij} \\ge t_i \\\\ -\\infty &
      \\text{otherwise} \\end{cases}, \\quad A = \\mathrm{softmax}(\\mathcal M(P, k)), \\quad
      C = A V

  with ``t_i`` the ``k``-th largest entry of row ``i`` (after ``attn_mask`` and
  ``is_causal``).
* ``hard`` -- Xu et al. 2015, "Show, Attend and Tell", stochastic hard attention: query
  ``t`` attends exactly one location ``s_t``, drawn from its attention distribution,

  .. math::

      p(s_{t,i} = 1 \\mid a) = \\alpha_{t,i} = \\mathrm{softmax}_i(e_{t,i}), \\quad
      \\hat z_t = \\sum_i s_{t,i}\\, a_i

  where the location ``a_i`` is a key ``k_i`` (scored, ``e_{t,i} = scale * q_t . k_i +
  M_{ti}``) and its value ``v_i`` (read).

Both compute the scores ``chunk_size`` queries at a time, so no ``(Nq, Nk)`` tensor
exists outside ``need_weights`` (and, for ``hard``, outside the backward of a training
call). Masks and ``is_causal`` follow :mod:`attnlab.contract`: a key not allowed is never
kept or sampled, and a fully masked query row gives zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import masked_softmax, slice_mask, work_dtype
from attnlab.mechanisms.base import Mechanism, by_heads
from attnlab.registry import HParam, Limit, Paper, register_mechanism
from attnlab.verify import causal_allowed

__all__ = ["HardAttention", "TopKAttention", "hard_reference", "total_reinforce_loss"]

ZHAO_2019 = Paper("Explicit Sparse Transformer: Concentrated Attention Through Explicit "
                  "Selection", "Guangxiang Zhao, Junyang Lin, Zhiyuan Zhang, Xuancheng Ren, "
                  "Qi Su, Xu Sun", 2019, "https://arxiv.org/abs/1912.11637")
XU_2015 = Paper("Show, Attend and Tell: Neural Image Caption Generation with Visual Attention",
                "Kelvin Xu, Jimmy Ba, Ryan Kiros, Kyunghyun Cho, Aaron Courville, Ruslan "
                "Salakhutdinov, Richard S. Zemel, Yoshua Bengio", 2015,
                "https://arxiv.org/abs/1502.03044")

_FLAGS = dict(family="selection", exact=False, causal=True, arbitrary_mask=True, cross=True,
              returns_weights=True, half_precision=True, kv_cache=True)
_CHUNK = HParam("chunk_size", int, 128, "queries c per chunk: at most (c, Nk) scores exist "
                "at a time", low=1)


def _scores(q, k_t, scale: float, i0: int, i1: int) -> torch.Tensor:
    """``(q_i . k_j) * scale`` of queries ``i0:i1`` against every key (``k_t`` is ``k^T`` in
    the work dtype). The product comes before the scale: equal dot products stay equal."""
    return (q[..., i0:i1, :].to(k_t.dtype) @ k_t) * scale


def _masked(s: torch.Tensor, mask, is_causal: bool, i0: int) -> torch.Tensor:
    """``s`` (rows ``i0:i0 + c``) with ``-inf`` where a bool mask or causality forbids the
    pair and a float mask added; the causal part per chunk, never an ``(Nq, Nk)`` mask."""
    c, nk = s.shape[-2:]
    if mask is not None:
        m = slice_mask(mask, i0, i0 + c, 0, nk)
        s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m.to(s.dtype)
    if is_causal:
        i = torch.arange(i0, i0 + c, device=s.device).unsqueeze(1)
        s = s.masked_fill(torch.arange(nk, device=s.device) > i, -math.inf)
    return s


def _gather_values(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``v[b, h, idx[b, h, ..., :]]``: ``(B, H, Nk, Dv)`` at ``(B, H, *S)`` indices gives
    ``(B, H, *S, Dv)``. A gather along the key dim: its backward scatters into a tensor of
    ``v``'s size, never ``(c, Nk, Dv)``."""
    B, H, _, Dv = v.shape
    flat = idx.reshape(B, H, -1, 1).expand(B, H, math.prod(idx.shape[2:]), Dv)
    return v.gather(2, flat).view(*idx.shape, Dv)


# ================================================================== top-k
@register_mechanism(
    "topk", paper=ZHAO_2019, time="O(N^2 D)",
    memory="O(c N + N k D), c = chunk_size (autograd keeps the k kept keys per query)",
    equation="P = Q K^T * scale + M; M(P, k)_ij = P_ij if P_ij >= t_i (the k-th largest of "
    "row i) else -inf; A = softmax(M(P, k)); C = A V",
    aliases=("explicit_sparse", "top_k"),
    hparams=[HParam("k", int, 8, "keys kept per query (the k largest scores)", low=1), _CHUNK],
    tiny_hparams=dict(k=4, chunk_size=5),
    limit=Limit(hparams=lambda n: {"k": n}, note="k >= N: every key kept, softmax attention"),
    **_FLAGS)
class TopKAttention(Mechanism):
    """Explicit Sparse Transformer (Zhao et al. 2019): softmax over the k largest scores.

    Per query, ``min(k, allowed keys)`` keys are kept: exactly ``k`` where at least ``k`` are
    allowed (``torch.topk``), all allowed ones otherwise; every other key has weight 0 and
    gets no gradient from that query. **Ties** at the ``k``-th score: the paper's threshold
    ``P_ij >= t_i`` would keep every tied key (more than ``k``); here exactly ``k`` are kept,
    and which of the tied keys is up to ``torch.topk`` (deterministic on one device, not
    specified across devices). ``k >= Nk`` keeps every key: softmax attention.

    Memory: a chunk of ``c`` queries scores all ``Nk`` keys (the selection needs them), so
    ``O(c Nk)`` at a time; autograd keeps only what the ``k`` kept keys need (their indices,
    weights and gathered keys and values): ``O(N k D)``, never ``(c, Nk)`` per chunk. The
    selection runs without autograd; the kept scores are then recomputed from the ``k``
    gathered keys for their gradient (``O(N k D)`` more work, against ``O(N^2 D)``).
    """

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        if need_weights:  # dense weights are (Nq, Nk) anyway: one pass over every head
            return self._rows(q, k, v, attn_mask, is_causal, scale, dropout_p, True)
        per_head = min(self.hp["chunk_size"], q.shape[-2]) * k.shape[-2]

        def fn(q_, k_, v_, m_, heads):
            return self._rows(q_, k_, v_, m_, is_causal, scale, dropout_p, False)[0]

        return by_heads(fn, q, k, v, attn_mask, per_head), None

    def _rows(self, q, k, v, mask, is_causal, scale, dropout_p, need_weights):
        work = work_dtype(q.dtype)
        kw, vw = k.to(work), v.to(work)
        k_t = kw.transpose(-2, -1)
        nq, nk = q.shape[-2], k.shape[-2]
        kk = min(self.hp["k"], nk)
        step = self.hp["chunk_size"]
        outs, weights = [], []
        for i0 in range(0, nq, step):
            i1 = min(i0 + step, nq)
            # The k largest masked scores, chosen without autograd: a -inf pick (fewer than
            # k allowed keys) gets weight 0 from the softmax, an all -inf row zeros.
            with torch.no_grad():
                s = _masked(_scores(q, k_t, scale, i0, i1), mask, is_causal, i0)
                top, idx = s.topk(kk, dim=-1, sorted=False)             # (B, H, c, kk)
            # Their gradient from the kept keys alone, q_i . k_j recomputed for the k chosen
            # j (autograd then keeps (c, kk, D), not the chunk's (c, Nk) scores); the value
            # stays top's exactly (top + 0).
            k_sel = _gather_values(kw, idx)                             # (B, H, c, kk, D)
            kept = (q[..., i0:i1, :].to(work).unsqueeze(-2) @ k_sel.mT).squeeze(-2) * scale
            top = top + (kept - kept.detach())
            p = masked_softmax(top, None)
            p_used = F.dropout(p, dropout_p) if dropout_p > 0 else p
            outs.append((p_used.unsqueeze(-2) @ _gather_values(vw, idx)).squeeze(-2))
            if need_weights:
                weights.append(torch.zeros_like(s).scatter(-1, idx, p).to(v.dtype))
        out = torch.cat(outs, dim=-2).to(v.dtype)
        return out, (torch.cat(weights, dim=-2) if need_weights else None)


# ================================================================== hard attention
def hard_reference(q, k, v, *, mech=None, scale=None, is_causal=False) -> torch.Tensor:
    """Hard attention in eval mode, dense in float64: ``onehot(argmax_j s_ij) V`` with
    ``s = q k^T * scale`` (``1/sqrt(D)`` by default; a positive scale moves no argmax),
    the first index among tied maxima (``torch.argmax``'s rule), zeros for a row with no
    allowed key. ``mech`` is unused."""
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        s = s.masked_fill(~causal_allowed(s.shape[-2], s.shape[-1], s.device), -math.inf)
    onehot = F.one_hot(s.argmax(dim=-1), s.shape[-1]).double()
    onehot = onehot * ~torch.isneginf(s).all(dim=-1, keepdim=True)
    return onehot @ v


def grid_inputs(q, k, v, gen):
    """``q, k`` rounded to multiples of 1/4: their dot products (multiples of 1/16, well
    inside 24 bits) are then exact in float32 as in float64, so the gate compares the
    argmax rule itself, not the rounding of two nearly tied scores (argmax is
    discontinuous there). Ties then break alike: first index, in both."""
    return torch.round(4 * q) / 4, torch.round(4 * k) / 4, v


def _log_softmax_rows(s: torch.Tensor):
    """``(log alpha, allowed, dead)``: log-softmax over keys with ``-inf`` scores excluded;
    a row with no allowed key (``dead``) is computed on zeros and must be masked by the
    caller (no NaN in the forward or the backward)."""
    allowed = ~torch.isneginf(s)
    dead = ~allowed.any(dim=-1)
    return torch.log_softmax(s.masked_fill(dead.unsqueeze(-1), 0.0), dim=-1), allowed, dead


@register_mechanism(
    "hard", paper=XU_2015, time="O(N^2 D)",
    memory="O(c N) forward (c = chunk_size); a training call's autograd keeps O(N^2): the "
    "soft sample (gumbel) or the softmax (reinforce) of every row",
    equation="s_t ~ Multinoulli({alpha_{t,i}}), alpha_{t,i} = softmax_i(e_{t,i}), "
    "e_{t,i} = scale * q_t . k_i + M_ti; z_t = sum_i s_{t,i} v_i; eval: s_t = onehot(argmax_i "
    "alpha_{t,i})",
    aliases=("hard_attention", "stochastic_hard"),
    hparams=[
        HParam("estimator", str, "gumbel", "gradient estimator in training: gumbel "
               "(straight-through Gumbel-softmax) or reinforce (score function, with "
               "reinforce_loss)", choices=("gumbel", "reinforce")),
        HParam("tau", float, 1.0, "Gumbel-softmax temperature of the backward's soft sample",
               low=0.0, low_exclusive=True),
        HParam("baseline_decay", float, 0.9, "reinforce: moving-average baseline b <- "
               "decay b + (1 - decay) mean(reward) (0.9 in Xu et al.)", low=0.0, high=1.0),
        HParam("entropy_weight", float, 0.0, "reinforce: lambda_e of the entropy bonus "
               "lambda_e H[s] in reinforce_loss", low=0.0),
        HParam("seed", int, None, "None: torch's global RNG (seed it with torch.manual_seed); "
               "an int: each call draws from a generator seeded with it (the same draw at every "
               "call: reproducible, not for training)", low=0, nullable=True),
        _CHUNK,
    ],
    tiny_hparams=dict(chunk_size=5, seed=0),
    limit=Limit(hparams=lambda n: {}, note="eval mode: one-hot at the argmax of the scores, "
                "times V", reference=hard_reference, inputs=grid_inputs),
    **_FLAGS)
class HardAttention(Mechanism):
    """Stochastic hard attention (Xu et al. 2015, sec. 4.1): each query reads one value.

    **Training** (``self.training``): ``s_t`` is drawn from ``alpha_t`` with the Gumbel-max
    trick, ``s_t = argmax_i(e_{t,i} + g_{t,i})``, ``g`` standard Gumbel noise from torch's
    global RNG (or the ``seed`` generator); the output row is exactly ``v_{s_t}``.

    * ``estimator="gumbel"``: straight-through Gumbel-softmax (Jang et al. 2017). The
      forward is the one-hot sample; the backward is that of the soft sample
      ``y = softmax((e + g) / tau)`` reading the values, so ``q`` and ``k`` get gradients
      from any loss. ``v`` gets the one-hot's gradient (only ``v_{s_t}``).
    * ``estimator="reinforce"``: the paper's rule. The output reaches ``v`` only; each
      training call with autograd on records ``log p(s_t)`` (and the entropy ``H[alpha_t]``)
      per (batch, head, query). After the task loss, add :meth:`reinforce_loss` of a
      per-example reward (``log p(y | s, a)`` in the paper: minus the per-example loss),
      which gives ``q`` and ``k`` their gradient; :func:`total_reinforce_loss` does it for
      every such module of a model.

    **Eval**: ``s_t = argmax_i alpha_{t,i}``, deterministic (the first index among ties).
    Decoding with a KV cache equals the causal forward in eval mode exactly (a row depends
    on its own scores only); in training, in distribution (rows are sampled independently).
    Dropout, if any, drops the selected weight of a row (zeroing it) as SDPA drops weights.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        # Xu et al.'s moving average of the reward, b_k = 0.9 b_{k-1} + 0.1 r_k (b_0 = 0);
        # a buffer: saved and restored with the model.
        self.register_buffer("baseline", torch.zeros(()))
        self._log_probs: list[torch.Tensor] = []
        self._entropies: list[torch.Tensor] = []

    # ---------------------------------------------------------------- forward
    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        sampling = self.training
        record = sampling and self.hp["estimator"] == "reinforce" and torch.is_grad_enabled()
        soft = sampling and self.hp["estimator"] == "gumbel" and torch.is_grad_enabled()
        gen = None
        if sampling and self.hp["seed"] is not None:
            gen = torch.Generator(device=q.device).manual_seed(self.hp["seed"])
        work = work_dtype(q.dtype)
        k_t, v_det = k.to(work).transpose(-2, -1), v.detach().to(work)
        step, nq = self.hp["chunk_size"], q.shape[-2]
        outs, weights, logps, ents = [], [], [], []
        for i0 in range(0, nq, step):
            s = _masked(_scores(q, k_t, scale, i0, min(i0 + step, nq)), attn_mask,
                        is_causal, i0)
            z = s
            if sampling:  # Gumbel-max: argmax(e + g) is a draw from softmax(e)
                u = torch.empty_like(s).exponential_(generator=gen)
                z = s - torch.log(u.clamp_min(torch.finfo(u.dtype).tiny))
            idx = z.detach().argmax(dim=-1)                             # (B, H, c)
            dead = torch.isneginf(s).all(dim=-1)
            out = _gather_values(v, idx).masked_fill(dead.unsqueeze(-1), 0.0)
            w = None
            if need_weights:
                w = F.one_hot(idx, s.shape[-1]).to(work).masked_fill(dead.unsqueeze(-1), 0.0)
            if soft:  # the forward stays v_s exactly; the backward is the soft sample's
                y = masked_softmax(z / self.hp["tau"], None)
                read = y @ v_det
                out = out + (read - read.detach()).to(v.dtype)
                w = None if w is None else w + (y - y.detach())
            if record:
                logps.append(self._log_prob(s, idx, dead, ents))
            if dropout_p > 0:  # one weight per row: the row is dropped or scaled
                keep = torch.rand(out.shape[:-1] + (1,), generator=gen, device=out.device)
                out = out * ((keep >= dropout_p).to(out.dtype) / (1.0 - dropout_p))
            outs.append(out)
            if need_weights:
                weights.append(w.to(v.dtype))
        if record:
            self._log_probs.append(torch.cat(logps, dim=-1))
            if self.hp["entropy_weight"] > 0:
                self._entropies.append(torch.cat(ents, dim=-1))
        out = torch.cat(outs, dim=-2)
        return out, (torch.cat(weights, dim=-2) if need_weights else None)

    def _log_prob(self, s, idx, dead, ents: list) -> torch.Tensor:
        """``log alpha_{t, s_t}`` per row (0 for a dead row), and the entropy
        ``H[alpha_t] = -sum_i alpha log alpha`` appended to ``ents`` if it is weighed."""
        log_alpha, allowed, dead = _log_softmax_rows(s)
        logp = log_alpha.gather(-1, idx.unsqueeze(-1)).squeeze(-1).masked_fill(dead, 0.0)
        if self.hp["entropy_weight"] > 0:
            safe = log_alpha.masked_fill(~allowed, 0.0)  # 0 log 0 = 0, and no NaN gradient
            ents.append(-(safe.exp().masked_fill(~allowed, 0.0) * safe).sum(-1))
        return logp

    # ---------------------------------------------------------------- REINFORCE
    @property
    def has_samples(self) -> bool:
        """Whether training calls recorded samples that :meth:`reinforce_loss` has not used."""
        return bool(self._log_probs)

    @property
    def recorded_batch(self) -> int:
        """The batch size of the recorded samples (0 when there are none)."""
        return self._log_probs[0].shape[0] if self._log_probs else 0

    def clear_samples(self) -> None:
        """Forget the recorded samples (and the graphs they hold) without a loss."""
        self._log_probs.clear()
        self._entropies.clear()

    def reinforce_loss(self, reward: torch.Tensor) -> torch.Tensor:
        """The surrogate loss of Xu et al.'s rule (eq. 12) for the samples recorded since the
        last call, then forgets them and updates the baseline.

        ``reward``: ``(B,)``, one per example (the paper's ``log p(y | s, a)``: minus the
        example's loss), detached here. With ``log p(s^b) = sum_{calls, heads, t} log
        alpha_{t, s_t}`` of example ``b`` and the baseline ``b_{k-1}`` of the *previous*
        calls (so the estimator stays unbiased), it returns

            ``-mean_b [ (r_b - b_{k-1}) log p(s^b) + lambda_e H[s^b] ]``

        whose gradient is minus the REINFORCE estimate of ``d E[r] / d(q, k)`` (plus the
        entropy bonus); then ``b_k = decay b_{k-1} + (1 - decay) mean_b r_b``.
        """
        if self.hp["estimator"] != "reinforce":
            raise ValueError(f"hard: reinforce_loss needs estimator='reinforce'; this module "
                             f"has estimator={self.hp['estimator']!r}")
        if not self._log_probs:
            raise RuntimeError("hard: reinforce_loss found no recorded sample; run a forward "
                               "pass in training mode (module.train()) with autograd enabled "
                               "first, and call reinforce_loss once per such pass")
        B = self._log_probs[0].shape[0]
        if not isinstance(reward, torch.Tensor):
            raise TypeError(f"hard: reward must be a torch.Tensor of shape ({B},); got "
                            f"{type(reward).__name__}")
        if reward.shape != (B,) or not reward.is_floating_point():
            raise ValueError(f"hard: reward must be a floating tensor of shape ({B},), one per "
                             f"example; got {reward.dtype} shape {tuple(reward.shape)}")
        if any(lp.shape[0] != B for lp in self._log_probs):
            raise ValueError(f"hard: the recorded calls have batch sizes "
                             f"{[lp.shape[0] for lp in self._log_probs]}; one reward per "
                             f"example needs one batch size")
        # In the records' dtype (the work dtype: float32 at least).
        like = self._log_probs[0]
        r = reward.detach().to(like.device, like.dtype)
        log_p = sum(lp.flatten(1).sum(1) for lp in self._log_probs)
        loss = -((r - self.baseline.to(like.dtype)) * log_p).mean()
        if self._entropies:
            loss = loss - self.hp["entropy_weight"] * sum(
                h.flatten(1).sum(1) for h in self._entropies).mean()
        with torch.no_grad():
            d = self.hp["baseline_decay"]
            self.baseline.copy_(d * self.baseline.to(like.dtype) + (1.0 - d) * r.mean())
        self.clear_samples()
        return loss


def total_reinforce_loss(model: nn.Module, reward: torch.Tensor) -> torch.Tensor | None:
    """The sum of :meth:`HardAttention.reinforce_loss` over every ``hard`` module of
    ``model`` holding samples (each updates its baseline and forgets them); ``None`` when
    none does. Call it once per training forward, after the task loss::

        loss = task_loss.mean()
        extra = total_reinforce_loss(model, -per_example_loss.detach())
        if extra is not None:
            loss = loss + extra
        loss.backward()

    ``reward`` may also be 0-d: one reward for the whole batch (what a trainer that only
    has the batch's mean loss can give), the same for every example: still unbiased, as
    the baseline is, but noisier than per-example rewards.
    """
    one = isinstance(reward, torch.Tensor) and reward.dim() == 0
    losses = [m.reinforce_loss(reward.expand(m.recorded_batch) if one else reward)
              for m in model.modules() if isinstance(m, HardAttention) and m.has_samples]
    return sum(losses) if losses else None
