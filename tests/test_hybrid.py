"""The hybrid family: heads of different mechanisms in one layer.

Its defining property: head slice ``[c_0 + .. + c_{i-1}, c_0 + .. + c_i)`` is exactly part
``i``'s mechanism run on that slice alone. Checked against parts built separately and
against independent formulas (SDPA, a dense band mask written here), then the limit
case, the flags (the AND of the parts'), gradients and the errors of bad ``heads``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import naive_attention_f64
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.hybrid  # noqa: F401
from attnlab.mechanisms.hybrid import head_counts, parse_heads
from attnlab.verify import verify

SW = "sliding_window(window=4, block_size=4)"


def qkv(B=2, H=4, N=16, D=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3))


def hybrid(heads, H=4, D=4, **kw):
    return attnlab.create_for("hybrid", head_dim=D, num_heads=H, max_seq_len=64,
                              heads=heads, **kw)


def band(n, w, causal):
    """Sliding window's pattern, pair by pair (Beltagy et al. 2020)."""
    return torch.tensor([[(i - w < j <= i) if causal else abs(i - j) <= w // 2
                          for j in range(n)] for i in range(n)])


def test_registered_in_its_family():
    assert attnlab.list_mechanisms(family="hybrid") == ["hybrid"]
    assert attnlab.get("hybrid").limit.hparams(8) == {"heads": None}


# ---------------------------------------------------------------- one kind = that mechanism
@pytest.mark.parametrize("name,hp", [("sdpa", {}), ("sliding_window", dict(window=4, block_size=4)),
                                     ("linear", dict(chunk_size=4)), ("dot", {}),
                                     ("reference", dict(precision="float64"))])
@pytest.mark.parametrize("causal", [False, True])
def test_every_head_of_one_kind_is_that_mechanism(name, hp, causal):
    args = ", ".join(f"{k}={v}" for k, v in hp.items())
    text = f"{name}({args})*4" if hp else f"{name}*4"
    mech = hybrid(text)
    alone = attnlab.create_for(name, head_dim=4, num_heads=4, max_seq_len=64, **hp)
    q, k, v = qkv(dtype=torch.float32)
    kp = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    kp[0, ..., 11:] = False  # key padding: every mechanism here takes it
    for mask in (None, kp):
        got = mech(q, k, v, attn_mask=mask, is_causal=causal)
        want = alone(q, k, v, attn_mask=mask, is_causal=causal)
        assert torch.equal(got, want), (name, mask is not None)
    assert mech.default_scale(4) == alone.default_scale(4)  # dot: 1, the others 1/sqrt(D)


def test_default_heads_is_exact_softmax_attention():
    mech = attnlab.create_for("hybrid", head_dim=4, num_heads=3)
    assert mech.counts == (3,) and mech.spec.exact and mech.spec.kv_cache
    q, k, v = qkv(H=3)
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(2)) < 0.7
    torch.testing.assert_close(mech(q, k, v, attn_mask=mask),
                               naive_attention_f64(q, k, v, mask), rtol=1e-12, atol=1e-12)
    assert verify("hybrid").ok and verify("hybrid", causal=True).ok


# ---------------------------------------------------------------- a mix = its parts side by side
def by_parts(text, H, q, k, v, mech, **kw):
    """Each part built on its own (parameters copied), run on its slice, concatenated."""
    outs, h0 = [], 0
    for part, n, sub in zip(parse_heads(text), mech.counts, mech.parts, strict=True):
        alone = attnlab.create_for(part.name, head_dim=q.shape[-1], num_heads=n,
                                   max_seq_len=64, **part.hparams).double()
        alone.load_state_dict(sub.state_dict())
        s = slice(h0, h0 + n)
        mask = kw.get("attn_mask")
        m = mask if mask is None or mask.shape[1] == 1 else mask[:, s]
        outs.append(alone(q[:, s], k[:, s], v[:, s], attn_mask=m,
                          is_causal=kw.get("is_causal", False)))
        h0 += n
    return torch.cat(outs, dim=1)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 20), b=st.integers(1, 2), causal=st.booleans(),
       padded=st.booleans(), seed=st.integers(0, 1000))
def test_a_mix_is_its_parts_on_their_slices(n, b, causal, padded, seed):
    text = f"{SW}*2+sdpa+linear(chunk_size=4)*1"
    mech = hybrid(text, H=4).double()
    assert mech.counts == (2, 1, 1)
    q, k, v = qkv(B=b, N=n, seed=seed)
    mask = None
    if padded:  # key padding, the one mask linear takes
        mask = torch.rand(b, 1, 1, n, generator=torch.Generator().manual_seed(seed)) < 0.7
        mask[..., 0] = True
    out = mech(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, by_parts(text, 4, q, k, v, mech, attn_mask=mask,
                                             is_causal=causal), rtol=0, atol=0)
    # ... and, independently: the band mask for heads 0-1, SDPA for head 2.
    allowed = band(n, 4, causal)[None, None] if mask is None else band(n, 4, causal) & mask
    torch.testing.assert_close(out[:, :2], naive_attention_f64(q[:, :2], k[:, :2], v[:, :2],
                                                               allowed), rtol=1e-10, atol=1e-10)
    sdpa_mask = None if mask is None else mask.expand(b, 1, n, n)
    if causal:
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        sdpa_mask = tril if sdpa_mask is None else sdpa_mask & tril
    want = F.scaled_dot_product_attention(q[:, 2:3], k[:, 2:3], v[:, 2:3], attn_mask=sdpa_mask)
    rows = (sdpa_mask if sdpa_mask is not None else torch.ones(1, dtype=torch.bool))
    if rows.any(-1).all():  # SDPA gives NaN on fully masked rows, the contract zeros
        torch.testing.assert_close(out[:, 2:3], want, rtol=1e-10, atol=1e-10)


def test_per_head_masks_reach_their_heads_and_weights_join():
    text = "reference*1+sdpa*1+local(block_size=4)*2"
    mech = hybrid(text).double()
    q, k, v = qkv()
    mask = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)) < 0.6
    got = mech(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, by_parts(text, 4, q, k, v, mech, attn_mask=mask),
                               rtol=0, atol=0)
    blocks = torch.tensor([[i // 4 == j // 4 for j in range(16)] for i in range(16)])
    torch.testing.assert_close(got[:, 2:], naive_attention_f64(
        q[:, 2:], k[:, 2:], v[:, 2:], mask[:, 2:] & blocks), rtol=1e-10, atol=1e-10)
    # local never forms weights: the whole cannot either; two weight-forming parts can.
    with pytest.raises(ValueError, match="cannot return attention weights"):
        mech(q, k, v, need_weights=True)
    both = hybrid("reference*1+sdpa*3").double()
    out, w = both(q, k, v, attn_mask=mask, need_weights=True)
    s = (q @ k.transpose(-1, -2) / 2).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(w, torch.softmax(s, -1).nan_to_num(0.0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, w @ v, rtol=1e-10, atol=1e-10)


def test_each_part_keeps_its_own_default_scale():
    mech = hybrid("dot*2+sdpa*2")
    assert mech.default_scale(4) is None  # 1 and 1/2 differ: each part its own
    q, k, v = qkv(dtype=torch.float32)
    out = mech(q, k, v).double()
    tol = dict(rtol=1e-5, atol=1e-5)  # float32 against float64
    torch.testing.assert_close(out[:, :2], naive_attention_f64(q[:, :2], k[:, :2], v[:, :2],
                                                               scale=1.0), **tol)
    torch.testing.assert_close(out[:, 2:], naive_attention_f64(q[:, 2:], k[:, 2:], v[:, 2:]),
                               **tol)
    half = mech(q, k, v, scale=0.3).double()  # an explicit scale reaches every part
    torch.testing.assert_close(half, naive_attention_f64(q, k, v, scale=0.3), **tol)


# ---------------------------------------------------------------- flags: the AND of the parts'
def test_flags_are_the_and_of_the_parts():
    s = hybrid("local*2+linear*2").spec
    assert (s.causal, s.arbitrary_mask, s.key_padding, s.cross, s.exact, s.kv_cache,
            s.returns_weights, s.learnable) == (True, False, True, False, False, False,
                                                False, False)
    assert "local" in s.memory and "linear" in s.memory
    s = hybrid("sdpa*2+reference*2").spec
    assert s.exact and s.kv_cache and s.cross and s.arbitrary_mask
    assert hybrid("additive*1+sdpa*3").spec.learnable
    assert not hybrid("linformer(k=4)*2+sdpa*2").spec.causal
    assert type(hybrid("local*4")).spec is attnlab.get("hybrid")  # the registry keeps its own


def test_what_one_part_cannot_do_is_refused():
    q, k, v = qkv(dtype=torch.float32)
    mix = hybrid("local(block_size=4)*2+linear(chunk_size=4)*2")
    with pytest.raises(ValueError, match="cannot take an arbitrary attn_mask"):
        mix(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"needs Nq == Nk"):
        mix(q[:, :, :5], k, v)
    with pytest.raises(ValueError, match="has no causal form"):
        hybrid("linformer(k=4)*2+sdpa*2")(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match=r"q has 2 heads, but this module was built for "
                                         r"num_heads=4"):
        mix(q[:, :2], k[:, :2], v[:, :2])


# ---------------------------------------------------------------- gradients
def test_gradients_reach_every_part():
    mech = hybrid("additive*1+general*1+synthesizer_dense*1+sdpa*1", D=4)
    q, k, v = (t.float().requires_grad_() for t in qkv())
    mech(q, k, v, is_causal=True).pow(2).sum().backward()
    named = dict(mech.named_parameters())
    assert {n.split(".")[1] for n in named} == {"0", "1", "2"}
    for name, p in named.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(t.grad is not None and t.grad[:, 3].abs().sum() > 0 for t in (q, k, v))


def test_gradcheck_of_a_mix():
    mech = hybrid(f"{SW}*1+sdpa*1", H=2).double()
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, N=6, D=3))
    assert torch.autograd.gradcheck(lambda a, b, c: mech(a, b, c, is_causal=True), (q, k, v))


# ---------------------------------------------------------------- the heads string
def test_parse_types_values_by_the_parts_hyperparameters():
    parts = parse_heads(" sliding-window( window = 8 ,block_size=4 ) * 3 + reference("
                        "precision='float64')+linear(eps=1e-5)*1")
    assert [(p.name, p.count) for p in parts] == [("sliding_window", 3), ("reference", None),
                                                  ("linear", 1)]
    assert parts[0].hparams == {"window": 8, "block_size": 4}
    assert parts[1].hparams == {"precision": "float64"} and parts[2].hparams == {"eps": 1e-5}
    assert type(parts[2].hparams["eps"]) is float
    assert head_counts(parts, 6, "x") == [3, 2, 1]
    mech = hybrid("performer(num_features=8, redraw=false)*2+sdpa", H=3)
    assert mech.counts == (2, 1) and mech.parts[0].hp["redraw"] is False
    assert hybrid("sdpa()").counts == (4,)


BAD = [
    ("", ValueError, r"part 1 of '' is empty; expected name\[\(key=value"),
    ("sdpa*2+", ValueError, r"part 2 of 'sdpa\*2\+' is empty"),
    ("sdpa*3", ValueError, r"the counts sum to 3, but num_heads=4"),
    ("sdpa*2+local*3", ValueError, r"the counts sum to 5, but num_heads=4"),
    ("sdpa*4+local", ValueError, r"the counts given sum to 4, leaving no head for 'local'"),
    ("sdpa+local", ValueError, r"only one part may leave out its count"),
    ("slidng_window*4", ValueError, r"part 1 'slidng_window\*4': mechanism: unknown name "
                                    r"'slidng_window'; did you mean 'sliding_window'"),
    ("sdpa*0+local*4", ValueError, r"the count after '\*' must be an int >= 1; got '0'"),
    ("sdpa*two", ValueError, r"the count after '\*' must be an int >= 1; got 'two'"),
    ("sdpa*2*2", ValueError, r"'sdpa\*2\*2' is malformed"),
    ("sdpa(*4", ValueError, r"unclosed '\('"),
    ("sdpa((x=1))*4", ValueError, r"unbalanced or nested parentheses"),
    ("sliding_window(windw=3)*4", TypeError, r"sliding_window has no hyperparameter 'windw' "
                                             r"\(did you mean 'window'\?\)"),
    ("sliding_window(window=x)*4", ValueError, r"hyperparameter 'window' must be int; got 'x'"),
    ("sliding_window(window=0)*4", ValueError, r"part 1 .*'window' must be >= 1; got 0"),
    ("sliding_window(window)*4", ValueError, r"expected key=value .*; got 'window'"),
    ("sliding_window(window=2,window=3)*4", ValueError, r"window is given twice"),
    ("sdpa(head_dim=3)*4", ValueError, r"head_dim comes from the layer"),
    ("performer(redraw=maybe)*4", ValueError, r"'redraw' must be bool \(true or false\)"),
    ("reference(precision=float33)*4", ValueError, r"must be one of .*did you mean 'float64'"),
    ("hybrid*4", ValueError, r"other than hybrid itself"),
]


@pytest.mark.parametrize("text,err,pattern", BAD, ids=[b[0] or "empty" for b in BAD])
def test_bad_heads_give_clear_errors(text, err, pattern):
    with pytest.raises(err, match=r"hybrid: .*" + pattern):
        hybrid(text)


def test_non_string_heads_and_missing_context():
    with pytest.raises(TypeError, match=r"hybrid: hyperparameter 'heads' must be str; got int"):
        hybrid(4)
    with pytest.raises(ValueError, match=r"hybrid: hyperparameter 'num_heads' is required"):
        attnlab.create("hybrid", heads="sdpa")
    # a part that needs head_dim, without one: its own error, naming the part
    with pytest.raises(ValueError, match=r"hybrid: heads part 1 'additive\*2'.*'head_dim' is "
                                         r"required"):
        attnlab.create("hybrid", heads="additive*2+sdpa*2", num_heads=4)
