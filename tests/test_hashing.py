"""Hashing / clustering family: ``reformer`` (LSH attention) and ``sinkhorn``.

Limit cases are exact attention (outputs and gradients within 1e-5 in float32); the
general case is checked against key sets computed here, independently, from the paper's
definitions, and then the float64 reference restricted to those sets.
"""

from __future__ import annotations

import pytest
import torch
from conftest import naive_attention_f64, saved_numels
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.mechanisms.hashing.reformer import SELF_SCORE
from attnlab.mechanisms.hashing.sinkhorn import sinkhorn_normalise

TOL = dict(rtol=1e-5, atol=1e-5)


def rand(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def qkv(B=2, H=2, N=16, D=4, Dv=3, seed=0, grad=False):
    return (rand(B, H, N, D, seed=seed, grad=grad), rand(B, H, N, D, seed=seed + 1, grad=grad),
            rand(B, H, N, Dv, seed=seed + 2, grad=grad))


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def assert_same_as_reference(out, q, k, v, mask=None, causal=False, k_ref=None):
    """Output and q/k/v gradients equal the float64 reference (keys ``k_ref`` if given)."""
    expected = naive_attention_f64(q, k if k_ref is None else k_ref, v, mask, is_causal=causal)
    torch.testing.assert_close(out.double(), expected, **TOL)
    w = rand(*out.shape, seed=99)
    got = torch.autograd.grad((out * w).sum(), (q, k, v), allow_unused=True)
    want = torch.autograd.grad((expected * w.double()).sum(), (q, k, v), allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if b is None:  # shared QK: k is ignored by both sides
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b.float(), **TOL)


def reformer(**hp):
    return attnlab.create("reformer", **{"fixed_rotations": True, **hp})


# ============================================================================ reformer


@settings(max_examples=25)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 24), D=st.integers(1, 6),
       Dv=st.integers(1, 5), n_hashes=st.integers(1, 3), extra=st.integers(0, 8),
       seed=st.integers(0, 2**16))
def test_reformer_one_bucket_unshared_is_exact_attention(B, H, N, D, Dv, n_hashes, extra, seed):
    # The limit case: one chunk (bucket_size >= N), no own-position masking, separate
    # keys. Several rounds are still exact: each round has the same key set (union = all).
    q, k, v = qkv(B, H, N, D, Dv, seed=seed, grad=True)
    mech = reformer(bucket_size=N + extra, n_hashes=n_hashes, shared_qk=False, mask_self=False)
    assert_same_as_reference(mech(q, k, v), q, k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_reformer_one_bucket_shared_qk_is_attention_on_normalised_keys(causal):
    q, k, v = qkv(N=12, grad=True)
    out = reformer(bucket_size=12, n_hashes=1, mask_self=False)(q, k, v, is_causal=causal)
    assert_same_as_reference(out, q, k, v, causal=causal, k_ref=unit(q))


def test_reformer_own_position_gets_no_weight_unless_alone():
    q, k, v = qkv(N=10, grad=True)
    off_diag = ~torch.eye(10, dtype=torch.bool)
    mech = reformer(bucket_size=10, n_hashes=2)  # shared_qk, mask_self by default
    assert_same_as_reference(mech(q, k, v), q, k, v, mask=off_diag, k_ref=unit(q))
    # Causal: query 0 has only itself, so it attends itself; the others never do.
    out = mech(q, k, v, is_causal=True)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0].detach(), rtol=0, atol=1e-6)
    allowed = off_diag & torch.ones(10, 10, dtype=torch.bool).tril()
    expected = naive_attention_f64(q, unit(q), v, allowed)
    torch.testing.assert_close(out[:, :, 1:].double(), expected[:, :, 1:], **TOL)
    one = mech(q[:, :, :1], k[:, :, :1], v[:, :, :1])  # N = 1: itself is all there is
    torch.testing.assert_close(one, v[:, :, :1].detach(), rtol=0, atol=1e-6)


def lsh_sets(mech, q, k, causal):
    """Union over rounds of each query's key set, ``(B, H, N, N)`` bool, computed from the
    paper's definitions with plain loops: bucket h(x) = argmax([xR; -xR]), sort by
    (bucket, position), chunks of b, same bucket and (own or previous chunk) -- or, causal,
    same bucket and at most b places back in sorted order."""
    B, H, N, D = q.shape
    b = min(mech.hp["bucket_size"], N)
    nc = N // b
    rot = mech.rotations(H, D, nc, q.device, q.dtype)
    sets = torch.zeros(B, H, N, N, dtype=torch.bool)
    for bi in range(B):
        for h in range(H):
            for r in range(mech.hp["n_hashes"]):
                def hashed(x, bi=bi, h=h, r=r):
                    xr = x[bi, h].detach() @ rot[h, r]
                    bucket = torch.cat([xr, -xr], dim=-1).argmax(-1).tolist()
                    order = sorted(range(N), key=lambda t: (bucket[t], t))
                    return bucket, {t: s for s, t in enumerate(order)}
                bq, sq = hashed(q)
                bk, sk = hashed(k) if not mech.hp["shared_qk"] else (bq, sq)
                for i in range(N):
                    for j in range(N):
                        if bq[i] != bk[j]:
                            continue
                        if causal:
                            ok = 0 <= sq[i] - sk[j] <= b
                        else:
                            ok = nc == 1 or (sq[i] // b - sk[j] // b) % nc in (0, 1)
                        sets[bi, h, i, j] |= ok
    return sets


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N,b", [(16, 4), (15, 5)])  # 4 chunks; 3 chunks (odd: 4 buckets)
def test_reformer_shared_qk_is_attention_over_the_union_of_lsh_sets(N, b, causal, n_hashes):
    q, k, v = qkv(N=N, D=4, seed=3, grad=True)
    mech = reformer(bucket_size=b, n_hashes=n_hashes, seed=7)
    sets = lsh_sets(mech, unit(q), None, causal)
    eye = torch.eye(N, dtype=torch.bool)
    assert (sets & eye).sum() == sets.shape[0] * sets.shape[1] * N  # each query meets itself
    assert not sets.all()  # really sparse: the test would notice a dense result
    allowed = sets & ~eye
    alone = ~allowed.any(-1, keepdim=True)
    allowed |= eye & alone  # mask_self: itself only when it has no other key
    assert_same_as_reference(mech(q, k, v, is_causal=causal), q, k, v, mask=allowed,
                             k_ref=unit(q))


def test_reformer_unshared_is_attention_over_the_union_of_lsh_sets():
    # Separate hashes: a query may find no key of its bucket; its row is then zeros.
    q, k, v = qkv(N=16, D=4, seed=5, grad=True)
    mech = reformer(bucket_size=4, n_hashes=2, shared_qk=False, seed=1)
    assert mech.hp["mask_self"] is None  # follows shared_qk: no self masking here
    sets = lsh_sets(mech, q, k, causal=False)
    assert not sets.all()
    assert_same_as_reference(mech(q, k, v), q, k, v, mask=sets)


def test_reformer_identical_rounds_equal_one_round():
    q, k, v = qkv(N=16, seed=2)
    one = reformer(bucket_size=4, n_hashes=1, seed=3)
    two = reformer(bucket_size=4, n_hashes=2, seed=3)
    rot = one.rotations(2, 4, 4, q.device, q.dtype)
    two.rotations = lambda *a: torch.cat([rot, rot], dim=1)
    for causal in (False, True):
        torch.testing.assert_close(two(q, k, v, is_causal=causal), one(q, k, v, is_causal=causal),
                                   rtol=1e-6, atol=1e-6)
    # ...while distinct rounds do change the result (the comparison above can fail).
    assert not torch.allclose(reformer(bucket_size=4, n_hashes=2, seed=3)(q, k, v),
                              one(q, k, v), atol=1e-3)


def test_reformer_is_causal_even_though_hashes_of_future_tokens_change():
    q, k, v = qkv(N=32, D=4, seed=4)
    mech = reformer(bucket_size=4, n_hashes=2, seed=2)
    out = mech(q, k, v, is_causal=True)
    for t in (1, 9, 20, 31):
        q2, v2 = q.clone(), v.clone()
        q2[:, :, t:] = rand(*q2[:, :, t:].shape, seed=t)
        v2[:, :, t:] = rand(*v2[:, :, t:].shape, seed=t + 100)
        out2 = mech(q2, k, v2, is_causal=True)
        torch.testing.assert_close(out2[:, :, :t], out[:, :, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out2[:, :, t:], out[:, :, t:])


def test_reformer_rotations_fixed_or_redrawn_from_the_seed():
    q, k, v = qkv(N=32, seed=6)
    fixed = reformer(bucket_size=4, seed=5)
    torch.testing.assert_close(fixed(q, k, v), fixed(q, k, v), rtol=0, atol=0)
    fresh = attnlab.create("reformer", bucket_size=4, seed=5)  # fixed_rotations=False
    a, b = fresh(q, k, v), fresh(q, k, v)
    assert not torch.allclose(a, b)  # new rotations every call, as in the paper
    again = attnlab.create("reformer", bucket_size=4, seed=5)
    torch.testing.assert_close(again(q, k, v), a, rtol=0, atol=0)  # reproducible from seed
    assert not torch.allclose(reformer(bucket_size=4, seed=6)(q, k, v), fixed(q, k, v))


def test_reformer_half_precision_matches_float32():
    q, k, v = qkv(N=16, seed=8)
    mech = reformer(bucket_size=4, n_hashes=2)
    ref = mech(q, k, v)
    half = mech(q.half(), k.half(), v.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, rtol=0, atol=5e-3)


def test_reformer_self_score_is_far_below_real_scores():
    assert SELF_SCORE <= -1e8


# ============================================================================ sinkhorn


def sinkhorn(D, **hp):
    torch.manual_seed(0)
    return attnlab.create_for("sinkhorn", head_dim=D, num_heads=2, **hp)


@settings(max_examples=25)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 24), D=st.integers(1, 6),
       Dv=st.integers(1, 5), extra=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_sinkhorn_one_block_is_exact_attention(B, H, N, D, Dv, extra, seed):
    # One block: S = [1], the sorted block is the block itself and is not added twice.
    q, k, v = qkv(B, H, N, D, Dv, seed=seed, grad=True)
    assert_same_as_reference(sinkhorn(D, block_size=N + extra)(q, k, v), q, k, v)


def test_sinkhorn_matrix_is_doubly_stochastic():
    k = rand(2, 3, 64, 8, seed=1)
    mech = sinkhorn(8, block_size=8, sinkhorn_iters=50, temperature=0.5)
    s = mech.sorting_matrix(k)
    assert s.shape == (2, 3, 8, 8) and (s > 0).all()
    ones = torch.ones(2, 3, 8)
    torch.testing.assert_close(s.sum(-1), ones, rtol=0, atol=1e-4)
    torch.testing.assert_close(s.sum(-2), ones, rtol=0, atol=1e-4)
    # The normalisation itself, on a matrix far from doubly stochastic.
    r = torch.tensor([[3.0, 0.0, -2.0], [1.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    s = sinkhorn_normalise(r, 200)
    torch.testing.assert_close(s.sum(0), torch.ones(3), rtol=0, atol=1e-4)
    torch.testing.assert_close(s.sum(1), torch.ones(3), rtol=0, atol=1e-4)
    assert not torch.allclose(r.exp().sum(1), torch.ones(3), atol=0.5)


def test_sinkhorn_blocks_attend_themselves_and_the_sorted_block():
    # Independent assembly from the paper's definition, given S: block i's queries attend
    # [K_i; sum_j S_ij K_j] with values [V_i; sum_j S_ij V_j].
    B, H, N, D, b = 2, 2, 12, 4, 3
    q, k, v = qkv(B, H, N, D, 5, seed=9)
    mech = sinkhorn(D, block_size=b, sinkhorn_iters=5)
    s = mech.sorting_matrix(k).double()
    expected = torch.zeros(B, H, N, 5, dtype=torch.float64)
    nb = N // b
    for bi in range(B):
        for h in range(H):
            kb = k[bi, h].double().view(nb, b, D)
            vb = v[bi, h].double().view(nb, b, 5)
            for i in range(nb):
                keys = torch.cat([kb[i], sum(s[bi, h, i, j] * kb[j] for j in range(nb))])
                vals = torch.cat([vb[i], sum(s[bi, h, i, j] * vb[j] for j in range(nb))])
                p = torch.softmax(q[bi, h, i * b:(i + 1) * b].double() @ keys.T / D**0.5, -1)
                expected[bi, h, i * b:(i + 1) * b] = p @ vals
    torch.testing.assert_close(mech(q, k, v).double(), expected, rtol=1e-5, atol=1e-5)


def test_sinkhorn_gradients_reach_the_sorting_network():
    q, k, v = qkv(N=16, D=4, seed=10, grad=True)
    mech = sinkhorn(4, block_size=4)
    mech(q, k, v).pow(2).sum().backward()
    params = dict(mech.named_parameters())
    assert set(params) == {"sort_in.weight", "sort_in.bias", "sort_out.weight"}
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    with torch.no_grad():  # and the network matters: other weights, other output
        before = mech(q, k, v)
        mech.sort_out.weight.mul_(-3.0)
        assert not torch.allclose(mech(q, k, v), before, atol=1e-4)


@st.composite
def sinkhorn_padding(draw):
    """``(keep, block_size)``: ``keep`` ``(B, N)`` bool over several blocks, any pattern of
    real keys, at least one per row."""
    b, nb, B = draw(st.integers(1, 4)), draw(st.integers(2, 5)), draw(st.integers(1, 2))
    rows = []
    for _ in range(B):
        row = torch.tensor(draw(st.lists(st.booleans(), min_size=b * nb, max_size=b * nb)))
        row[draw(st.integers(0, b * nb - 1))] = True
        rows.append(row)
    return torch.stack(rows), b


@settings(max_examples=30)
@given(case=sinkhorn_padding(), seed=st.integers(0, 2**16))
def test_sinkhorn_padded_keys_weigh_nothing(case, seed):
    keep, b = case
    B, N = keep.shape
    mask = keep[:, None, None, :]
    mech = sinkhorn(4, block_size=b).double()
    q, k, v = (t.double() for t in qkv(B, 2, N, 4, 3, seed=seed))
    out = mech(q, k, v, attn_mask=mask)
    # No output row (padded queries' included) depends on a padded key or value.
    pad = ~keep[:, None, :, None]
    k2 = torch.where(pad, 50 * rand(*k.shape, seed=seed + 5).double(), k)
    v2 = torch.where(pad, 1e4 + rand(*v.shape, seed=seed + 6).double(), v)
    torch.testing.assert_close(mech(q, k2, v2, attn_mask=mask), out, rtol=0, atol=0)
    # Every row is a convex combination of real values: constant values come out as is
    # (a sorted slot weighting its real keys by less than 1 would shrink them).
    ones = torch.ones_like(v)
    torch.testing.assert_close(mech(q, k, ones, attn_mask=mask), ones, rtol=0, atol=1e-12)


@settings(max_examples=20)
@given(case=sinkhorn_padding(), seed=st.integers(0, 2**16), data=st.data())
def test_sinkhorn_one_real_key_gives_its_value_to_every_query(case, seed, data):
    _, b = case
    B, N = case[0].shape
    real = [data.draw(st.integers(0, N - 1)) for _ in range(B)]
    keep = torch.zeros(B, N, dtype=torch.bool)
    keep[torch.arange(B), real] = True
    q, k, v = (t.double() for t in qkv(B, 2, N, 4, 3, seed=seed))
    out = sinkhorn(4, block_size=b).double()(q, k, v, attn_mask=keep[:, None, None, :])
    expected = v[torch.arange(B), :, real].unsqueeze(2).expand_as(out)  # (B, H, N, Dv)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_sinkhorn_one_real_key_at_default_block_size():
    # The audit's case: N = 1024, 16 blocks of 64, only key 0 real (rows came out as
    # 0.001 to 0.71 times v[0]).
    q, k, v = qkv(1, 2, 1024, 8, 8, seed=3)
    keep = torch.zeros(1, 1, 1, 1024, dtype=torch.bool)
    keep[..., 0] = True
    out = sinkhorn(8)(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, v[:, :, :1].expand_as(out), rtol=1e-5, atol=1e-6)


# ============================================================================ errors, memory


@pytest.mark.parametrize("name,hp,N,pattern", [
    ("reformer", dict(bucket_size=4), 18,
     r"reformer: bucket_size=4 does not divide the sequence length N=18 \(bucket_size not "
     r"dividing N\); pad N to a multiple of 4"),
    ("sinkhorn", dict(block_size=5), 16,
     r"sinkhorn: block_size=5 does not divide the sequence length N=16"),
])
def test_group_size_not_dividing_n_is_a_clear_error(name, hp, N, pattern):
    q, k, v = qkv(N=N)
    mech = attnlab.create_for(name, head_dim=4, num_heads=2, **hp)
    with pytest.raises(ValueError, match=pattern):
        mech(q, k, v)


@pytest.mark.parametrize("name,hp,exc,pattern", [
    ("reformer", dict(bucket_size=0), ValueError, r"reformer: hyperparameter 'bucket_size' must be >= 1; got 0"),
    ("reformer", dict(n_hashes=0), ValueError, r"reformer: hyperparameter 'n_hashes' must be >= 1; got 0"),
    ("reformer", dict(n_hashes=-2), ValueError, r"'n_hashes' must be >= 1; got -2"),
    ("reformer", dict(shared_qk=1), TypeError, r"'shared_qk' must be a bool; got int 1"),
    ("reformer", dict(seed=-1), ValueError, r"'seed' must be >= 0; got -1"),
    ("sinkhorn", dict(block_size=-4), ValueError, r"sinkhorn: hyperparameter 'block_size' must be >= 1; got -4"),
    ("sinkhorn", dict(temperature=0.0), ValueError, r"'temperature' must be > 0.0; got 0.0"),
    ("sinkhorn", dict(temperature=-1.0), ValueError, r"'temperature' must be > 0.0; got -1.0"),
    ("sinkhorn", dict(sinkhorn_iters=0), ValueError, r"'sinkhorn_iters' must be >= 1; got 0"),
])
def test_bad_hyperparameters(name, hp, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attnlab.create_for(name, head_dim=4, num_heads=2, **hp)


def test_other_call_time_errors():
    q, k, v = qkv(N=16)
    with pytest.raises(ValueError, match=r"reformer: is_causal=True needs shared_qk=True"):
        reformer(bucket_size=4, shared_qk=False)(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match=r"sinkhorn: q head dim 4 does not match head_dim=8"):
        sinkhorn(8, block_size=4)(q, k, v)
    with pytest.raises(ValueError, match=r"sinkhorn has no causal form"):
        sinkhorn(4, block_size=4)(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match=r"reformer needs Nq == Nk"):
        reformer(bucket_size=4)(q, k[:, :, :8], v[:, :, :8])


@pytest.mark.parametrize("name,hp,per_token", [
    ("reformer", dict(bucket_size=64, n_hashes=2), 2 * 2 * 64),  # r rounds x 2b keys
    ("sinkhorn", dict(block_size=64), 2 * 64),  # 2b keys
])
def test_no_saved_tensor_is_quadratic(name, hp, per_token):
    N = 4096
    q, k, v = qkv(B=1, H=1, N=N, D=8, Dv=8, grad=True)
    mech = attnlab.create_for(name, head_dim=8, num_heads=1, **hp)
    with saved_numels() as sizes:
        out = mech(q, k, v, is_causal=attnlab.get(name).causal)
    out.sum().backward()
    # The largest saved tensor is the chunked score matrix, N x per_token, never N x N.
    assert max(sizes) == N * per_token < N * N, (name, max(sizes))
