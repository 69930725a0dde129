"""The gated linear-attention family against flash-linear-attention's *Triton* kernels
(``fla.ops``: chunk_retention, chunk_gla, chunk_simple_gla, chunk_delta_rule), on CUDA.

CPU runs check the same mechanisms against fla's plain-PyTorch ``naive.py`` references
(``tests/test_gated_linear.py``, ``tests/test_delta.py``); these kernels need Triton and a
GPU, so without them every test here is skipped (CI has neither). The inputs are handed
over in fla's ``(B, T, H, K)`` layout with the gates attnlab computes, so each test checks
the recurrence itself, not the projections around it. fla's kernels use TF32 matmuls:
the tolerance is TF32's, not float32's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.bench.fla_reference import available, triton_available

pytestmark = pytest.mark.skipif(not (available() and triton_available()),
                                reason="fla's Triton kernels need fla-core, Triton and a GPU")
TF32 = dict(rtol=2e-2, atol=2e-2)
B, H, T, D = 2, 4, 200, 64  # T not a multiple of fla's chunk of 64


def make(name, **hp):
    torch.manual_seed(0)
    return attnlab.create_for(name, head_dim=D, num_heads=H, **hp).cuda()


def qkv(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(B, H, T, D, device="cuda", generator=g) for _ in range(3))


def bthd(x):
    return x.transpose(1, 2).contiguous()


def ops():
    import fla.ops  # optional: the fla extra, and Triton

    return fla.ops


def test_retnet_equals_fla_chunk_retention():
    m = make("retnet")
    q, k, v = qkv()
    o, _ = ops().chunk_retention(bthd(q), bthd(k), bthd(v))
    torch.testing.assert_close(m(q, k, v, is_causal=True), bthd(o), **TF32)


def test_gla_equals_fla_chunk_gla_with_the_same_log_gates():
    m = make("gla")
    q, k, v = qkv(1)
    with torch.no_grad():
        gk = m.log_alpha(k)
        ours = m(q, k, v, is_causal=True)
    o, _ = ops().chunk_gla(bthd(q), bthd(k), bthd(v), bthd(gk))
    torch.testing.assert_close(ours, bthd(o), **TF32)


def test_mamba2_equals_fla_chunk_simple_gla():
    m = make("mamba2")
    q, k, v = qkv(2)
    with torch.no_grad():
        dt = m.dt(k)
        g = -dt * m.A_log.exp()[:, None]
        ours = m(q, k, v, is_causal=True)
    o, _ = ops().chunk_simple_gla(bthd(q), bthd(k), bthd(v * dt.unsqueeze(-1)), bthd(g),
                                  scale=1.0)
    torch.testing.assert_close(ours, bthd(o), **TF32)


def test_deltanet_equals_fla_chunk_delta_rule():
    m = make("deltanet")
    q, k, v = qkv(3)
    with torch.no_grad():
        beta = torch.sigmoid(torch.einsum("bhnd,hd->bhn", k, m.w_beta) + m.b_beta[:, None])
        ours = m(q, k, v, is_causal=True)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    o, _ = ops().chunk_delta_rule(bthd(qn), bthd(kn), bthd(v), beta.transpose(1, 2).contiguous(),
                                  scale=D ** -0.5)
    torch.testing.assert_close(ours, bthd(o), **TF32)
