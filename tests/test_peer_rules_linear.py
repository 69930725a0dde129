"""The peers' rule for recurrent attention, as fla (flash-linear-attention) tests it:
the chunkwise form == the recurrent form == a naive float64 formula, at realistic sizes.

For every kernel / gated-linear / delta-rule mechanism with a decoding state: the causal
forward (chunkwise, ``chunk_size`` 64), :meth:`Mechanism.decode` one token at a time (the
recurrent form: ``n = 1 < chunk_size``) and the paper's equation written plainly below in
float64 (from the mechanism's own parameters and random features), on float16 inputs of
``T >= 1024`` positions. The Performer runs at ``kernel_eps = 0`` (the plain estimator,
where a floor of the shifted denominator once cost errors of 0.2 to 2) and at its default.
CI runs one size per mechanism (D = 64 and 256); ``-m release`` runs the grid (T up to
2048, D up to 256, several seeds).

Metric: ``max |a - b| / max |ref|`` (one bad row fails). float16 outputs carry their own
rounding (``2^-11`` relative); chunk and recurrent compute in float32 and may differ by
reordering only, so both bounds are a few float16 ulps.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab

TOL_NAIVE = 4e-3  # float16 output rounding (4.9e-4 of max |ref|) and float32 sums over T
TOL_FORMS = 2e-3  # chunkwise vs recurrent: float32 reorderings, then one float16 rounding


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- naive float64 formulas
def causal_average(A, v, eps):
    """sum_{j<=i} A_ij v_j / max(sum_{j<=i} A_ij, eps)."""
    A = A.tril()
    return (A @ v) / A.sum(-1, keepdim=True).clamp_min(eps)


def naive_linear(m, q, k, v, scale):
    def phi(x):
        return torch.where(x > 0, x + 1, torch.exp(x))
    return causal_average(phi(q * scale) @ phi(k).mT, v, m.hp["eps"])


def naive_cosformer(m, q, k, v, scale):
    M, n = m.hp["max_seq_len"], q.shape[-2]
    i = torch.arange(n, dtype=torch.float64)
    w = torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / M)
    return causal_average(torch.relu(q * scale) @ torch.relu(k).mT * w, v, m.hp["eps"])


def naive_performer(m, q, k, v, scale):
    W = m.projection.double()

    def phi(x):
        x = x * math.sqrt(scale)
        c = m.hp["kernel_eps"] / math.sqrt(W.shape[0])
        return torch.exp(x @ W.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(W.shape[0]) + c

    if m.hp["kernel_eps"]:  # its shifted features are not this formula: not compared
        return None
    return causal_average(phi(q) @ phi(k).mT, v, m.hp["eps"])


def decayed(q, k, v, log_a):
    """o_t = sum_{s<=t} (q_t . (prod_{r=s+1..t} a_r) k_s) v_s, a ``(B, H, T, 1 | D)``, by
    row blocks (``(rows, T, D)`` at a time)."""
    cum = log_a.cumsum(2)
    T = q.shape[2]
    out = []
    for i0 in range(0, T, 64):
        i = torch.arange(i0, min(i0 + 64, T))
        expo = cum[:, :, i, None, :] - cum[:, :, None, :, :]               # (B, H, r, T, d)
        expo = expo.masked_fill((torch.arange(T)[None, :] > i[:, None])[..., None], -math.inf)
        A = (q[:, :, i, None, :] * k[:, :, None, :, :] * expo.exp()).sum(-1)
        out.append(A @ v)
    return torch.cat(out, dim=2)


def naive_retnet(m, q, k, v, scale):
    H, T = q.shape[1], q.shape[2]
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
    d = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    D = torch.where(d >= 0, gamma[:, None, None] ** d.clamp_min(0), 0.0)
    return ((q * scale) @ k.mT * D) @ v


def naive_gla(m, q, k, v, scale):
    W1, W2, b = (p.detach().double() for p in (m.W1, m.W2, m.b))
    z = torch.einsum("bhnd,hrd,her->bhne", k, W1, W2) + b[:, None]
    return decayed(q * scale, k, v, F.logsigmoid(z) / m.hp["temperature"])


def naive_mamba2(m, q, k, v, scale):
    w, b, A_log = (p.detach().double() for p in (m.w_dt, m.b_dt, m.A_log))
    dt = F.softplus(torch.einsum("bhnd,hd->bhn", k, w) + b[:, None])
    log_a = -(dt * A_log.exp()[:, None]).unsqueeze(-1)
    return decayed(q * scale, k, v * dt.unsqueeze(-1), log_a)


def naive_deltanet(m, q, k, v, scale):
    """The recurrence itself in float64: S <- S (I - beta k k^T) + beta v k^T, o = S q."""
    w, b = m.w_beta.detach().double(), m.b_beta.detach().double()
    beta = torch.sigmoid(torch.einsum("bhnd,hd->bhn", k, w) + b[:, None])
    qn = q / q.norm(dim=-1, keepdim=True) * scale
    kn = k / k.norm(dim=-1, keepdim=True)
    B, H, T, D = q.shape
    S = q.new_zeros(B, H, v.shape[-1], D)
    out = []
    for t in range(T):
        kt, bt = kn[:, :, t], beta[:, :, t, None, None]
        S = S - bt * (S @ kt[..., None]) @ kt[..., None, :] + bt * v[:, :, t, :, None] @ kt[..., None, :]
        out.append((S @ qn[:, :, t, :, None])[..., 0])
    return torch.stack(out, dim=2)


NAIVE = {"linear": naive_linear, "cosformer": naive_cosformer, "performer": naive_performer,
         "retnet": naive_retnet, "gla": naive_gla, "mamba2": naive_mamba2,
         "deltanet": naive_deltanet}


def test_every_recurrent_mechanism_is_covered():
    """A mechanism with a decoding state and no softmax needs its naive formula here."""
    have = {n for n in attnlab.list_mechanisms(inputs=None)
            if attnlab.get(n).decode_state and attnlab.get(n).family in
            ("kernel", "gated_linear", "delta")}
    assert have == set(NAIVE)


# ---------------------------------------------------------------- the rule
def build(name, T, D, H, seed, **hp):
    torch.manual_seed(seed)
    extra = {"max_seq_len": T} if name == "cosformer" else {}
    if name == "performer":
        extra.update(seed=seed)
    return attnlab.registry.create_for(name, head_dim=D, num_heads=H, **extra, **hp).eval()


def inputs(T, D, H, seed):
    """float16 standard-normal q, k, v ``(1, H, T, D)``, as a layer's projections give
    (``q . k / sqrt(D)`` of unit variance: the Performer's shifts are then tens at D = 256)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, T, D, generator=g).half() for _ in range(3))


def rel(a, ref):
    return float((a.double() - ref).abs().max() / ref.abs().max())


def check(name, T, D, H=2, seed=0, **hp):
    m = build(name, T, D, H, seed, **hp)
    q, k, v = inputs(T, D, H, seed)
    scale = m.default_scale(D)
    with torch.no_grad():
        chunk = m(q, k, v, is_causal=True)
        state, steps = None, []
        for t in range(T):
            out, state = m.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
            steps.append(out)
        recurrent = torch.cat(steps, dim=2)
    assert chunk.dtype == recurrent.dtype == torch.float16
    naive = NAIVE[name](m, q.double(), k.double(), v.double(), scale)
    ref = naive if naive is not None else chunk.double()
    forms = float((chunk.double() - recurrent.double()).abs().max() / ref.abs().max())
    assert forms <= TOL_FORMS, (name, "chunk vs recurrent", forms)
    if naive is not None:
        assert rel(chunk, naive) <= TOL_NAIVE, (name, "chunk vs naive", rel(chunk, naive))
        assert rel(recurrent, naive) <= TOL_NAIVE, (name, "recurrent vs naive")


CI = [("linear", 1024, 64, {}), ("cosformer", 1024, 64, {}),
      ("performer", 1024, 256, {"kernel_eps": 0.0}), ("performer", 1024, 64, {}),
      ("retnet", 1024, 64, {}), ("gla", 1024, 64, {}), ("mamba2", 1024, 64, {}),
      ("deltanet", 1024, 64, {})]


@pytest.mark.parametrize("name,T,D,hp", CI, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CI])
def test_chunk_equals_recurrent_equals_naive(name, T, D, hp):
    check(name, T, D, **hp)


@pytest.mark.release
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("T,D", [(1024, 128), (1024, 256), (2048, 64)])
@pytest.mark.parametrize("name,hp", [(n, {}) for n in NAIVE] + [("performer", {"kernel_eps": 0.0})])
def test_release_grid(name, hp, T, D, seed):
    check(name, T, D, seed=seed, **hp)
