"""attnlab.nn: MultiheadAttention against torch.nn.MultiheadAttention, GQA/MQA, every
exact mechanism plugged in, RoPE and ALiBi properties, and clear errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnlab
import attnlab.nn.length_fold as fold_module
import attnlab.nn.multihead as mh_module
from attnlab.nn import MultiheadAttention, RotaryEmbedding, alibi_bias, alibi_slopes
from attnlab.registry import REQUIRED

DT = torch.float64
B, N, E, H = 2, 6, 16, 4
# Mechanisms whose score is softmax(Q K^T / sqrt(d)): same output as reference.
SOFTMAX_QK = {"reference", "sdpa", "flash", "scaled_dot"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def torch_twin(ours: MultiheadAttention) -> torch.nn.MultiheadAttention:
    """torch's layer with our weights (its in_proj is q, k, v stacked when dims agree)."""
    kdim, vdim = ours.kdim, ours.vdim
    t = torch.nn.MultiheadAttention(ours.embed_dim, ours.num_heads, bias=True, kdim=kdim,
                                    vdim=vdim, batch_first=True, dtype=DT)
    qw, kw, vw = ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight
    with torch.no_grad():
        if t._qkv_same_embed_dim:
            t.in_proj_weight.copy_(torch.cat([qw, kw, vw]))
        else:
            t.q_proj_weight.copy_(qw)
            t.k_proj_weight.copy_(kw)
            t.v_proj_weight.copy_(vw)
        t.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        t.out_proj.weight.copy_(ours.out_proj.weight)
        t.out_proj.bias.copy_(ours.out_proj.bias)
    return t.eval()


def randomize_biases(m: torch.nn.Module) -> None:
    # The default init zeros them, which would hide a bias mix-up.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_()


def make(mechanism="sdpa", **kw) -> MultiheadAttention:
    m = MultiheadAttention(kw.pop("embed_dim", E), kw.pop("num_heads", H), mechanism,
                           dtype=DT, **kw)
    randomize_biases(m)
    return m.eval()


def x_(n=N, e=E, b=B):
    return torch.randn(b, n, e, dtype=DT)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ---------------------------------------------------------------- torch equivalence


@pytest.mark.parametrize("mech", ["sdpa", "reference"])
def test_self_attention_matches_torch(mech):
    m = make(mech)
    x = x_()
    close(m(x), torch_twin(m)(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("mech", ["sdpa", "reference"])
def test_cross_attention_kdim_vdim_matches_torch(mech):
    m = make(mech, kdim=12, vdim=20)
    q, k, v = x_(5), x_(7, 12), x_(7, 20)
    close(m(q, k, v), torch_twin(m)(q, k, v, need_weights=False)[0])


@pytest.mark.parametrize("mech", ["sdpa", "reference"])
@pytest.mark.parametrize("float_mask", [False, True])
def test_key_padding_mask_matches_torch(mech, float_mask):
    m = make(mech)
    q, kv = x_(5), x_(7)
    pad = torch.zeros(B, 7, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, :2] = True
    if float_mask:
        pad = torch.zeros(B, 7, dtype=DT).masked_fill(pad, float("-inf"))
    close(m(q, kv, kv, key_padding_mask=pad),
          torch_twin(m)(q, kv, kv, key_padding_mask=pad, need_weights=False)[0])


@pytest.mark.parametrize("mech", ["sdpa", "reference"])
def test_attn_mask_matches_torch(mech):
    m = make(mech)
    x = x_()
    allow = torch.rand(N, N) > 0.4
    allow[:, 0] = True  # no fully masked row: torch gives NaN there, attnlab zeros
    # attnlab: True = may attend; torch: True = may NOT attend.
    close(m(x, attn_mask=allow), torch_twin(m)(x, x, x, attn_mask=~allow, need_weights=False)[0])
    bias = torch.randn(N, N, dtype=DT)
    close(m(x, attn_mask=bias), torch_twin(m)(x, x, x, attn_mask=bias, need_weights=False)[0])
    # A per-(batch, head) mask: torch wants it flattened to (B*H, Nq, Nk).
    allow4 = torch.rand(B, H, N, N) > 0.4
    allow4[..., 0] = True
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, -2:] = True
    ref = torch_twin(m)(x, x, x, attn_mask=~allow4.reshape(B * H, N, N), key_padding_mask=pad,
                        need_weights=False)[0]
    close(m(x, attn_mask=allow4, key_padding_mask=pad), ref)


@pytest.mark.parametrize("mech", ["sdpa", "reference"])
def test_causal_and_weights_match_torch(mech):
    m = make(mech, is_causal=True)
    x = x_()
    future = torch.ones(N, N, dtype=torch.bool).triu(1)
    out_t, w_t = torch_twin(m)(x, x, x, attn_mask=future, need_weights=True,
                               average_attn_weights=False)
    out, w = m(x, need_weights=True)
    close(out, out_t)
    close(w, w_t)
    assert w.shape == (B, H, N, N)
    close(m(x, is_causal=False), torch_twin(m)(x, x, x, need_weights=False)[0])


def test_mixed_bool_and_float_masks_merge():
    m = make("reference")
    x = x_()
    allow = torch.rand(N, N) > 0.3
    allow[:, 0] = True
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, -1] = True
    want = m(x, attn_mask=allow, key_padding_mask=pad)
    fpad = torch.zeros(B, N, dtype=DT).masked_fill(pad, float("-inf"))
    fallow = torch.zeros(N, N, dtype=DT).masked_fill(~allow, float("-inf"))
    close(m(x, attn_mask=allow, key_padding_mask=fpad), want)
    close(m(x, attn_mask=fallow, key_padding_mask=pad), want)


def test_fully_masked_row_gives_zeros_not_nan():
    m = make("reference", bias=False)
    allow = torch.ones(N, N, dtype=torch.bool)
    allow[2] = False
    out = m(x_(), attn_mask=allow)
    assert torch.isfinite(out).all()
    close(out[:, 2], torch.zeros(B, E, dtype=DT))


def test_batch_first_false_transposes():
    m = make("sdpa", is_causal=True)
    m2 = make("sdpa", is_causal=True, batch_first=False)
    m2.load_state_dict(m.state_dict())
    x = x_()
    close(m2(x.transpose(0, 1)).transpose(0, 1), m(x))


# ---------------------------------------------------------------- GQA / MQA


def test_gqa_with_all_kv_heads_equals_standard():
    std, gqa = make("sdpa"), make("sdpa", num_kv_heads=H)
    gqa.load_state_dict(std.state_dict())
    x = x_()
    close(gqa(x), std(x))


@pytest.mark.parametrize("mech", ["sdpa", "flash"])  # GQA native to SDPA / repeated heads
@pytest.mark.parametrize("kv", [1, 2])
def test_gqa_and_mqa_equal_hand_written(kv, mech):
    m = make(mech, num_kv_heads=kv)
    assert m.k_proj.weight.shape == (kv * E // H, E)
    x = x_()
    D, g = E // H, H // kv
    q = m.q_proj(x).view(B, N, H, D)
    k = m.k_proj(x).view(B, N, kv, D)
    v = m.v_proj(x).view(B, N, kv, D)
    heads = []
    for h in range(H):  # query head h reads kv head h // g
        s = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, h // g]) / math.sqrt(D)
        heads.append(torch.softmax(s, -1) @ v[:, :, h // g])
    close(m(x), m.out_proj(torch.cat(heads, dim=-1)))


# ---------------------------------------------------------------- every mechanism


def _build(name, **kw):
    spec = attnlab.get(name)
    missing = [h.name for h in spec.hparams if h.default is REQUIRED
               and h.name not in ("head_dim", "num_heads", "max_seq_len")]
    if missing:
        pytest.skip(f"{name} needs hyperparameters {missing}")
    return MultiheadAttention(32, 4, name, max_seq_len=64, **kw)


@pytest.mark.parametrize("name", attnlab.list_mechanisms(exact=True))
def test_exact_mechanisms_plug_in(name):
    spec = attnlab.get(name)
    ref = MultiheadAttention(32, 4, "reference").eval()
    m = _build(name).eval()
    missing, unexpected = m.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("attn.") for k in missing)
    x = torch.randn(2, 16, 32, requires_grad=True)
    if name in SOFTMAX_QK:
        tol = dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(x), ref(x), **tol)
        if spec.causal:
            torch.testing.assert_close(m(x, is_causal=True), ref(x, is_causal=True), **tol)
        if spec.arbitrary_mask:
            pad = torch.zeros(2, 16, dtype=torch.bool)
            pad[0, 10:] = True
            torch.testing.assert_close(m(x, key_padding_mask=pad),
                                       ref(x, key_padding_mask=pad), **tol)
    out = m.train()(x, is_causal=spec.causal)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_learnable_mechanism_gets_sizes_from_layer():
    if "additive" not in attnlab.list_mechanisms():
        pytest.skip("additive is not registered")
    m = MultiheadAttention(32, 4, "additive")
    assert m.attn.hp["head_dim"] == 8
    assert any(n.startswith("attn.") for n, _ in m.named_parameters())
    with pytest.raises(ValueError, match="head_dim"):
        MultiheadAttention(32, 4, "additive", head_dim=16)


# ---------------------------------------------------------------- RoPE


def naive_rope(x, positions, base=10000.0):
    """Complex form: z_i = x_i + i x_{i+d/2}, multiplied by exp(i m theta_i)."""
    d = x.shape[-1]
    theta = base ** (-2 * torch.arange(d // 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:])
    z = z * torch.exp(1j * positions[:, None].double() * theta)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_equals_complex_form_and_offsets():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 10, 8, dtype=DT)
    close(rope.rotate(x), naive_rope(x, torch.arange(10)))
    close(rope.rotate(x, offset=5), naive_rope(x, torch.arange(5, 15)))
    rope.rotate(x[..., :2, :])  # a short call first; the cache must grow for the long one
    long = torch.randn(1, 1, 300, 8)
    torch.testing.assert_close(rope.rotate(long), naive_rope(long.double(), torch.arange(300))
                               .float(), atol=1e-4, rtol=1e-4)


def test_rope_preserves_norm_and_is_relative():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 2, 12, 16, dtype=DT), torch.randn(1, 2, 12, 16, dtype=DT)
    close(rope.rotate(q).norm(dim=-1), q.norm(dim=-1))
    qr, kr = rope(q, k)
    qs, ks = rope(q, k, offset=37)  # shift every position equally
    close(qr @ kr.transpose(-1, -2), qs @ ks.transpose(-1, -2))
    # One vector pair: the score depends only on m - n.
    a, b = torch.randn(16, dtype=DT), torch.randn(16, dtype=DT)

    def score(m, n):
        return rope.rotate(a[None], m)[0] @ rope.rotate(b[None], n)[0]

    close(score(3, 1), score(10, 8))
    assert not torch.isclose(score(3, 1), score(3, 2))


def test_rope_in_layer_equals_manual():
    m = make("reference", positions="rope", is_causal=True)
    x = x_()
    D = E // H
    q = m.q_proj(x).view(B, N, H, D).transpose(1, 2)
    k = m.k_proj(x).view(B, N, H, D).transpose(1, 2)
    v = m.v_proj(x).view(B, N, H, D).transpose(1, 2)
    q, k = naive_rope(q, torch.arange(N)), naive_rope(k, torch.arange(N))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    close(m(x), m.out_proj(o.transpose(1, 2).reshape(B, N, E)))


def test_rope_at_given_positions_is_the_rows_of_the_whole_rotation():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 20, 8, dtype=DT)
    at = torch.tensor([17, 0, 5, 19, 4])  # a shard of a longer sequence, any order
    close(rope.rotate(x[..., at, :], positions=at), rope.rotate(x)[..., at, :])
    close(rope.rotate(x[..., :5, :], positions=at), naive_rope(x[..., :5, :], at))
    q, k = rope(x[..., :5, :], x[..., 5:10, :], positions=at)
    close(k, naive_rope(x[..., 5:10, :], at))
    for bad, err, msg in ((at.float(), TypeError, "int64"), (at[:4], ValueError, r"\(5,\)"),
                          (-at, ValueError, r"range \[-19, 0\]")):
        with pytest.raises(err, match=f"RotaryEmbedding: positions .*{msg}"):
            rope.rotate(x[..., :5, :], positions=bad)
    with pytest.raises(ValueError, match="offset must be 0 when positions are given"):
        rope.rotate(x[..., :5, :], 3, positions=at)
    with pytest.raises(ValueError, match="with positions, k must hold the same tokens as q"):
        rope(x[..., :5, :], x[..., :4, :], positions=at)


def test_rope_layer_at_shuffled_positions_is_the_shuffled_layer():
    """The defining property of positions: the tokens in another order, each given its own
    position, give the same rows in that order (ring attention's shards hold their tokens
    so; causality it reads from its layout, not from this order)."""
    m = make("reference", positions="rope")
    x, at = x_(), torch.tensor([4, 1, 5, 0, 3, 2])
    full = m(x)
    close(m(x[:, at], positions=at), full[:, at])
    # Without them the shuffled tokens sit at 0 .. N-1: other distances, other rows.
    assert not torch.allclose(m(x[:, at]), full[:, at])
    plain = make("reference")  # no RoPE: attention is permutation-equivariant already
    close(plain(x[:, at], positions=at), plain(x)[:, at])


def test_layer_positions_errors():
    m = make("reference", positions="rope", is_causal=True)
    x, at = x_(), torch.arange(N)
    with pytest.raises(ValueError, match="positions are for self-attention.*got key"):
        m(x, x_(), positions=at)
    with pytest.raises(ValueError, match="positions cannot be given with a kv_cache"):
        m(x, kv_cache=m.new_cache(), positions=at)
    with pytest.raises(ValueError, match=r"MultiheadAttention: positions must have shape \(6,\)"):
        m(x, positions=at[:3])
    alibi = make("reference", positions="alibi")
    with pytest.raises(ValueError, match="positions='alibi' biases the scores.*no positions"):
        alibi(x, positions=at)


# ---------------------------------------------------------------- ALiBi


def reference_get_slopes(n):
    """The slopes as in the ALiBi authors' code (ofirpress/attention_with_linear_biases)."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_2(p) + reference_get_slopes(2 * p)[0::2][: n - p]


def test_alibi_slopes():
    close(alibi_slopes(8).double(), torch.tensor([2.0 ** -i for i in range(1, 9)], dtype=DT))
    for n in (1, 3, 6, 12, 16, 20):
        torch.testing.assert_close(alibi_slopes(n), torch.tensor(reference_get_slopes(n)))


def test_alibi_bias_shape_and_causality():
    m = alibi_slopes(4).double()
    b = alibi_bias(4, 5, 7, dtype=DT, causal=True)
    assert b.shape == (1, 4, 5, 7) and b.dtype == DT
    i, j = torch.arange(5)[:, None], torch.arange(7)[None, :]
    assert torch.isneginf(b[0][:, j.expand(5, 7) > i.expand(5, 7)]).all()
    past = j <= i
    close(b[0][:, past], (-m[:, None, None] * (i - j))[:, past])
    bi = alibi_bias(4, 5, 5, dtype=DT)
    close(bi, bi.transpose(-1, -2))
    close(bi[0], -m[:, None, None] * (i - j[:, :5]).abs())


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_in_layer_equals_manual(causal):
    m = make("reference", positions="alibi", is_causal=causal)
    x = x_()
    D = E // H
    q, k, v = (p(x).view(B, N, H, D).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=alibi_bias(H, N, N, dtype=DT,
                                                                      causal=causal))
    close(m(x), m.out_proj(o.transpose(1, 2).reshape(B, N, E)))


# ---------------------------------------------------------------- causality, gradients


@pytest.mark.parametrize("positions", [None, "rope", "alibi"])
@pytest.mark.parametrize("mech", ["sdpa", "reference"])
def test_causal_outputs_ignore_future_tokens(mech, positions):
    m = make(mech, is_causal=True, positions=positions, num_kv_heads=2)
    x = x_()
    y = x.clone()
    y[:, 4:] = torch.randn(B, N - 4, E, dtype=DT)
    close(m(x)[:, :4], m(y)[:, :4])
    assert not torch.allclose(m(x)[:, 4:], m(y)[:, 4:])


def test_gradients_reach_every_parameter():
    m = MultiheadAttention(E, H, "sdpa", num_kv_heads=2, positions="rope", kdim=8, vdim=12)
    out = m(torch.randn(B, 5, E), torch.randn(B, 7, 8), torch.randn(B, 7, 12))
    out.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dropout_only_in_training():
    m = make("sdpa", dropout=0.5)
    x = x_()
    close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((30, 4), {}, ValueError, "embed_dim must be divisible by num_heads.*30.*4"),
    ((16, 0), {}, ValueError, "num_heads must be >= 1; got 0"),
    ((16, True), {}, TypeError, "num_heads must be an int"),
    ((0, 4), {}, ValueError, "embed_dim must be >= 1"),
    ((16, 4), {"num_kv_heads": 3}, ValueError, "num_kv_heads must divide num_heads=4.*3"),
    ((16, 4), {"positions": "rop"}, ValueError, "did you mean 'rope'"),
    ((16, 4), {"positions": "alibii"}, ValueError, "did you mean 'alibi'"),
    ((16, 4), {"dropout": 1.0}, ValueError, r"dropout must be a finite number in \[0.0, 1.0\); got 1.0"),
    ((12, 4), {"positions": "rope"}, ValueError, "even head_dim"),
    ((16, 4, "sdpaa"), {}, ValueError, "did you mean 'sdpa'"),
])
def test_bad_construction(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MultiheadAttention(*args, **kwargs)


def test_bad_call_inputs():
    m = MultiheadAttention(E, H)
    x = torch.randn(B, N, E)
    with pytest.raises(ValueError, match=r"query must be 3-D .*got 2-D shape \(6, 16\)"):
        m(x[0])
    with pytest.raises(ValueError, match=r"query feature size must be 16; got shape \(2, 6, 8\)"):
        m(x[..., :8])
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Nk\) = "
                                         r"\(2, 6\); got \(2, 5\)"):
        m(x, key_padding_mask=torch.zeros(B, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be broadcastable"):
        m(x, attn_mask=torch.ones(N, N + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        m(x, attn_mask=torch.ones(N, N, dtype=torch.long))
    with pytest.raises(ValueError, match="key batch size 3"):
        m(x, torch.randn(3, N, E), torch.randn(3, N, E))
    with pytest.raises(ValueError, match="key and value lengths differ"):
        m(x, torch.randn(B, 4, E), torch.randn(B, 5, E))
    with pytest.raises(ValueError, match="value was given without key"):
        m(x, value=x)
    with pytest.raises(ValueError, match="exceeds max_seq_len=4"):
        MultiheadAttention(E, H, max_seq_len=4)(x)


def test_input_dtype_is_the_modules_floating_dtype():
    m = MultiheadAttention(E, H)  # float32 parameters
    x = torch.randn(B, N, E)
    ids = torch.randint(0, 5, (B, N, E))
    with pytest.raises(TypeError, match=r"query must be a floating-point tensor of the "
                                        r"module's dtype torch.float32; got torch.int64"):
        m(ids)
    with pytest.raises(TypeError, match=r"key must be a floating-point tensor .* got torch.int64"):
        m(x, ids, x)
    with pytest.raises(TypeError, match=r"value must be a floating-point tensor .* got torch.int64"):
        m(x, x, ids)
    with pytest.raises(TypeError, match=r"query dtype torch.float64 does not match the module's "
                                        r"dtype torch.float32; convert the input"):
        m(x.double())
    with pytest.raises(TypeError, match=r"value dtype torch.float16 does not match the module's "
                                        r"dtype torch.float32"):
        m(x, x, x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs the projections itself
        assert m(x.bfloat16()).shape == (B, N, E)


@pytest.mark.parametrize("value", ["no", 1, 0, None, torch.tensor(True)])
def test_flags_must_be_bools(value):
    m = MultiheadAttention(E, H)
    x = torch.randn(B, N, E)
    got = rf"got {type(value).__name__} "
    with pytest.raises(TypeError, match=r"MultiheadAttention: need_weights must be a bool; " + got):
        m(x, need_weights=value)
    if value is not None:  # is_causal=None means the layer's default
        with pytest.raises(TypeError, match=r"MultiheadAttention: is_causal must be a bool; " + got):
            m(x, is_causal=value)
        with pytest.raises(TypeError, match=r"is_causal must be a bool; " + got):
            m(x, is_causal=value, kv_cache=attnlab.nn.KVCache())  # not read as "causal"
        with pytest.raises(TypeError, match=r"MultiheadAttention: is_causal must be a bool"):
            MultiheadAttention(E, H, is_causal=value)
    out, w = m(x, need_weights=np.True_)  # NumPy's bool is a bool
    assert w.shape == (B, H, N, N)
    torch.testing.assert_close(m(x, is_causal=np.True_), m(x, is_causal=True))


def test_mechanism_flags_are_enforced(monkeypatch):
    # A stand-in spec with every capability off; the registry itself is left untouched.
    real = attnlab.get("reference")
    weak = dataclasses.replace(real, causal=False, arbitrary_mask=False, cross=False,
                               returns_weights=False)
    monkeypatch.setattr(mh_module, "get", lambda name: weak)
    with pytest.raises(ValueError, match="no causal form"):
        MultiheadAttention(E, H, "weak", is_causal=True)
    with pytest.raises(ValueError, match="positions='alibi'"):
        MultiheadAttention(E, H, "weak", positions="alibi")
    with pytest.raises(ValueError, match="cross-attention"):
        MultiheadAttention(E, H, "weak", kdim=8)
    m = MultiheadAttention(E, H, "weak")
    x = torch.randn(B, N, E)
    m(x)  # plain self-attention works
    with pytest.raises(ValueError, match="no causal form"):
        m(x, is_causal=True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.zeros(B, N, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, attn_mask=torch.ones(N, N, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cross-attention; got Nq=6 != Nk=3"):
        m(x, x[:, :3])
    _, w = m(x, need_weights=True)  # no weights of its own: the effective ones
    assert w.shape == (B, H, N, N)


def test_rope_and_alibi_argument_errors():
    with pytest.raises(ValueError, match="head_dim must be even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        alibi_slopes(0)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        alibi_bias(2.0, 3, 3)


# ------------------------------------------------- Linformer's length fold in the layer
def unfolded(layer: MultiheadAttention, x, key):
    """The layer's computation without the fold: project, split heads, call the mechanism."""
    def heads(t, h):
        return t.view(t.shape[0], t.shape[1], h, layer.head_dim).transpose(1, 2)
    q = heads(layer.q_proj(x), layer.num_heads)
    g = layer.num_heads // layer.num_kv_heads  # grouped-query heads, repeated as SDPA does
    k = heads(layer.k_proj(key), layer.num_kv_heads).repeat_interleave(g, dim=1)
    v = heads(layer.v_proj(key), layer.num_kv_heads).repeat_interleave(g, dim=1)
    out = layer.attn(q, k, v)
    return layer.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("num_kv_heads,kdim,n,r,folds", [
    # fold when r kdim (n + D_kv) < n D_kv (kdim + r), D_kv = num_kv_heads * 4
    (4, None, 24, 4, True),     # 1792 < 7680: r=4 rows instead of 24
    (1, None, 24, 8, False),    # MQA, 3584 > 2304: projecting to D_kv=4 first is cheaper
    (2, 8, 24, 4, True),        # cross-attention with kdim != embed_dim: 1024 < 2304
    (4, None, 3, 4, False),     # n < r: 1216 > 960, mixing would grow the sequence
])
def test_linformer_layer_folds_the_length_projection_exactly(bias, num_kv_heads, kdim, n, r,
                                                             folds, monkeypatch):
    layer = MultiheadAttention(E, H, mechanism="linformer", k=r, max_seq_len=32, bias=bias,
                               num_kv_heads=num_kv_heads, kdim=kdim, vdim=kdim, dtype=DT)
    if bias:  # zero biases would hide a wrong bias term
        for lin in (layer.q_proj, layer.k_proj, layer.v_proj):
            torch.nn.init.normal_(lin.bias)
    calls = []
    real = fold_module.mixed_linear
    monkeypatch.setattr(fold_module, "mixed_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(B, 5, E, dtype=DT)
    key = torch.randn(B, n, kdim or E, dtype=DT)
    out = layer(x, key)
    assert bool(calls) == folds
    want = unfolded(layer, x, key)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    params = [p for p in layer.parameters()]
    g_out = torch.autograd.grad(out.square().sum(), params)
    g_want = torch.autograd.grad(want.square().sum(), params)
    for a, b in zip(g_out, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_linformer_layer_does_not_fold_per_head_projections_or_rope():
    x = torch.randn(B, 24, E, dtype=DT)
    per_head = MultiheadAttention(E, H, mechanism="linformer", k=4, max_seq_len=32,
                                  sharing="none", dtype=DT)
    assert per_head._length_fold(24) is None
    rope = MultiheadAttention(E, H, mechanism="linformer", k=4, max_seq_len=32,
                              positions="rope", dtype=DT)
    assert rope._length_fold(24) is None
    torch.testing.assert_close(per_head(x), unfolded(per_head, x, x))


# ------------------------------------------- effective weights of mechanisms without them
def _values(layer: MultiheadAttention, x):
    v = layer.v_proj(x).view(x.shape[0], x.shape[1], layer.num_kv_heads, layer.head_dim)
    return v.transpose(1, 2).repeat_interleave(layer.num_heads // layer.num_kv_heads, dim=1)


@pytest.mark.parametrize("name", [n for n in attnlab.list_mechanisms(returns_weights=False)
                                  if getattr(attnlab.get(n).cls, "effective_weights", True)])
def test_effective_weights_reproduce_the_output(name):
    """out = out_proj(A v) for the A returned with need_weights, padded keys get 0 weight."""
    n = 64  # >= nystromformer's 32 landmarks
    layer = MultiheadAttention(E, H, mechanism=name, max_seq_len=n, dtype=DT).eval()
    x = torch.randn(B, n, E, dtype=DT)
    pad = torch.zeros(B, n, dtype=torch.bool)
    pad[1, 40:] = True
    out, w = layer(x, key_padding_mask=pad, need_weights=True)
    assert w.shape == (B, H, n, n)
    mixed = (w @ _values(layer, x)).transpose(1, 2).reshape(B, n, E)
    torch.testing.assert_close(out, layer.out_proj(mixed), atol=1e-10, rtol=1e-8)
    assert (w[1, :, :, 40:] == 0).all()
    torch.testing.assert_close(layer(x, key_padding_mask=pad), out)  # same output either way


def test_effective_weights_of_an_exact_mechanism_are_the_softmax():
    """flash never forms its weights; its effective ones must be sdpa's softmax weights."""
    flash = MultiheadAttention(E, H, mechanism="flash", is_causal=True, dtype=DT).eval()
    ref = MultiheadAttention(E, H, mechanism="reference", is_causal=True, dtype=DT).eval()
    ref.load_state_dict(flash.state_dict())
    x = torch.randn(B, N, E, dtype=DT)
    torch.testing.assert_close(flash(x, need_weights=True)[1], ref(x, need_weights=True)[1])


def test_effective_weights_through_linformers_length_fold(monkeypatch):
    """With the fold (E, F mixed into the inputs) A = P_bar F, still out = A v."""
    layer = MultiheadAttention(E, H, mechanism="linformer", k=4, max_seq_len=32, dtype=DT)
    calls = []
    real = fold_module.mixed_linear
    monkeypatch.setattr(fold_module, "mixed_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(B, 24, E, dtype=DT)
    pad = torch.zeros(B, 24, dtype=torch.bool)
    pad[0, 20:] = True
    out, w = layer(x, key_padding_mask=pad, need_weights=True)
    assert calls  # the fold was taken
    mixed = (w @ _values(layer, x)).transpose(1, 2).reshape(B, 24, E)
    torch.testing.assert_close(out, layer.out_proj(mixed), atol=1e-10, rtol=1e-8)
    assert (w[0, :, :, 20:] == 0).all()
