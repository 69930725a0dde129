"""Shared test helpers: the independent reference and the mechanism sets under test."""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch.utils._python_dispatch import TorchDispatchMode

import attnlab

# Mechanism modules under development, registered before the registry-wide tests collect.
for _module in filter(None, os.environ.get("ATTNLAB_EXTRA_MODULES", "").split(",")):
    importlib.import_module(_module)

# The default run is seeded (derandomize): the same examples on every machine, so a red
# run is a reproducible finding, never a draw. `pytest --hypothesis-profile explore` draws
# fresh examples (200 where a test sets no count of its own) to look for new ones; a
# failure it finds is then fixed, or pinned with @example.
_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("seeded", deadline=None, max_examples=40, derandomize=True,
                          database=None, suppress_health_check=_SLOW)
settings.register_profile("explore", deadline=None, max_examples=200,
                          suppress_health_check=_SLOW)
settings.load_profile("seeded")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_runtest_setup(item):
    """Tests marked ``release`` (full grids, minutes each) run only when asked for:
    ``pytest -m release``; a plain ``pytest`` skips them."""
    if item.get_closest_marker("release") and "release" not in (item.config.option.markexpr
                                                                  or ""):
        pytest.skip("the full grid runs with -m release")


@pytest.fixture(scope="module")
def one_thread():
    """For modules that train tiny models: a second intra-op thread buys nothing there, and
    on a busy machine its OpenMP barrier spins make training tests several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def naive_attention_f64(q, k, v, mask=None, is_causal=False, scale=None):
    """softmax(QK^T*scale + M)V in float64, written independently of attnlab.

    Loops over (batch, head) and uses explicit exp/sum so it shares no code with the
    library; fully masked rows are defined as zeros (the documented contract).
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    allowed = torch.ones(B, H, Nq, Nk, dtype=torch.bool)
    bias = torch.zeros(B, H, Nq, Nk, dtype=torch.float64)
    if mask is not None:
        m = mask.expand(B, H, Nq, Nk) if mask.dim() == 4 else mask.reshape(
            (1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(B, H, Nq, Nk)
        if m.dtype == torch.bool:
            allowed = allowed & m
        else:
            bias = bias + m.double()
            allowed = allowed & ~torch.isneginf(m)
    if is_causal:
        allowed = allowed & torch.ones(Nq, Nk, dtype=torch.bool).tril()
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = q[b, h] @ k[b, h].T * scale + torch.where(allowed[b, h], bias[b, h], 0.0)
            s = s.masked_fill(~allowed[b, h], float("-inf"))
            row_max = s.max(dim=-1, keepdim=True).values
            row_max = torch.where(torch.isneginf(row_max), 0.0, row_max)
            e = torch.exp(s - row_max)
            z = e.sum(dim=-1, keepdim=True)
            p = torch.where(z > 0, e / torch.where(z > 0, z, 1.0), 0.0)
            out[b, h] = p @ v[b, h]
    return out


def softmax_equivalent_mechanisms() -> list[str]:
    """Exact, parameter-free mechanisms of the whole contract (any mask, Nq != Nk): with an
    explicit ``scale`` they compute softmax(QK^T*scale + M)V and must equal the reference.
    ``ring`` (self-attention, key padding only) is proven in tests/test_ring.py."""
    return [n for n in attnlab.list_mechanisms(exact=True) if not attnlab.get(n).learnable
            and attnlab.get(n).arbitrary_mask and attnlab.get(n).cross]


def build(name: str, head_dim: int, num_heads: int = 1, **hp):
    """The mechanism for tiny test inputs: its ``tiny_hparams``, overridden by ``hp``."""
    hp = {**attnlab.get(name).tiny_hparams, **hp}
    return attnlab.create_for(name, head_dim=head_dim, num_heads=num_heads, max_seq_len=64, **hp)


@contextmanager
def saved_numels():
    """Yields a list that fills with the element count of every tensor autograd saves for
    backward inside the block: the evidence that no (Nq, Nk) tensor is kept."""
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield sizes


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates (forward and
    backward), so a transient (Nq, Nk) tensor is caught even if it is never saved."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def near_range_inputs(dtype, B=2, H=2, N=16, D=64, Dv=None, seed=0):
    """``q``, ``k`` around one direction per head with ``|q|^2 ~ |k|^2 ~ 1e5``: the
    unscaled ``q . k`` (up to 1e5) overflows float16 (max 65504), while the scaled scores
    ``q . k / 8`` spread by a few units (a softmax far from one-hot). Rounded to ``dtype``;
    the references get these rounded values."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
    u = 316.0 * u / u.norm(dim=-1, keepdim=True)
    q, k = (u + 0.05 * torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
            for _ in range(2))
    v = torch.randn(B, H, N, Dv or D, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v))


def assert_causal(mech, q, k, v, t: int) -> None:
    """Tokens after ``t`` (changed a lot) change no output row ``<= t`` and no gradient of
    those rows reaches them; they do change the later rows."""
    out = mech(q, k, v, is_causal=True)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 5
    out2 = mech(q2, k2, v2, is_causal=True)
    torch.testing.assert_close(out2[:, :, :t + 1], out[:, :, :t + 1], rtol=0, atol=0)
    assert (out2[:, :, t + 1:] - out[:, :, t + 1:]).abs().max() > 1e-3
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    mech(*leaves, is_causal=True)[:, :, :t + 1].pow(2).sum().backward()
    assert all((x.grad[:, :, t + 1:] == 0).all() for x in leaves)
