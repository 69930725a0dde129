"""Luong et al. 2015's local attention (local-m and local-p) and its use as seq2seq
cross-attention.

Evidence: local-m with a window covering the keys is softmax attention (the conftest's
independent reference, and SDPA); any window equals softmax attention under a band mask
written here; weights outside the window are exactly zero; local-p equals eq. 9-10 written
here query by query in float64 (hypothesis over Nq, Nk, D, key padding); p_t stays in
[0, S]; gradients reach W_p and v_p (gradcheck); no (Nq, Nk) tensor is formed; bad windows
are refused. Then a Seq2SeqTransformer with Luong cross-attention trains, decodes as its
own teacher-forced forward predicts, is padding-invariant, and the task takes the option.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LargestTensor, naive_attention_f64
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.luong  # noqa: F401
from attnlab.cli.main import main
from attnlab.data.seq2seq import BOS, EOS, PAD, collate, seq2seq_task
from attnlab.mechanisms.luong import predictive_reference
from attnlab.models.seq2seq import Seq2SeqTransformer
from attnlab.tasks import get_task
from attnlab.train.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(B=2, H=2, nq=9, nk=9, d=4, seed=0, dtype=torch.float64):
    return (rand(B, H, nq, d, seed=seed, dtype=dtype), rand(B, H, nk, d, seed=seed + 1, dtype=dtype),
            rand(B, H, nk, d, seed=seed + 2, dtype=dtype))


def monotonic(**hp):
    return attnlab.create("luong_monotonic", **hp).double()


def predictive(d=4, seed=0, **hp):
    torch.manual_seed(seed)
    m = attnlab.create("luong_predictive", head_dim=d, **hp).double()
    with torch.no_grad():  # larger than the init, so p_t spreads over the source
        m.v_p.mul_(6.0)
    return m


def band(nq, nk, centre, D):
    """``(Nq, Nk)`` bool: key s in query t's window, |s - centre(t)| <= D."""
    t = torch.arange(nq, dtype=torch.float64)[:, None]
    s = torch.arange(nk, dtype=torch.float64)[None, :]
    return (s - centre(t)).abs() <= D


# ---------------------------------------------------------------- local-m
@settings(max_examples=25)
@given(nq=st.integers(1, 12), nk=st.integers(1, 12), causal=st.booleans(),
       seed=st.integers(0, 2**16))
def test_monotonic_window_covering_the_source_is_full_attention(nq, nk, causal, seed):
    q, k, v = qkv(nq=nq, nk=nk, seed=seed)
    m = monotonic(window=max(nq, nk), chunk_size=4)
    out = m(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, naive_attention_f64(q, k, v, is_causal=causal))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))


@settings(max_examples=30)
@given(nq=st.integers(1, 12), nk=st.integers(1, 12), D=st.integers(0, 4),
       align=st.sampled_from(["identity", "scaled"]), causal=st.booleans(),
       masked=st.booleans(), seed=st.integers(0, 2**16))
def test_monotonic_is_softmax_under_its_band(nq, nk, D, align, causal, masked, seed):
    q, k, v = qkv(nq=nq, nk=nk, seed=seed)
    mask = rand(nq, nk, seed=seed + 5) > -0.5 if masked else None
    m = monotonic(window=D, align=align, chunk_size=3)
    if align == "identity":
        def centre(t):
            return t
    else:
        def centre(t):
            return t * (nk - 1) / (nq - 1) if nq > 1 else 0 * t
    allowed = band(nq, nk, centre, D) & (True if mask is None else mask)
    out = m(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, naive_attention_f64(q, k, v, allowed, is_causal=causal))


def test_monotonic_weights_outside_the_window_are_exactly_zero():
    q, k, v = qkv(nq=11, nk=11)
    for causal in (False, True):
        out, w = monotonic(window=2, chunk_size=4)(q, k, v, is_causal=causal, need_weights=True)
        inside = band(11, 11, lambda t: t, 2) & (torch.ones(11, 11).tril().bool() if causal
                                                 else True)
        assert (w[..., ~inside] == 0).all() and (w[..., inside] > 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 11, dtype=torch.float64))
        torch.testing.assert_close(out, w @ v)


def test_monotonic_queries_past_the_source_get_zeros():
    q, k, v = qkv(nq=8, nk=3)
    out = monotonic(window=1)(q, k, v)
    assert (out[..., 4:, :] == 0).all() and (out[..., :4, :] != 0).all()  # t - 1 > Nk - 1


# ---------------------------------------------------------------- local-p
def eq_9_10(q, k, v, W_p, v_p, D, scale, keep=None):
    """Luong's eq. 9-10, query by query in float64: S real keys (right padding), the
    window's softmax, the Gaussian after it."""
    B, H, nq, _ = q.shape
    out = torch.zeros(B, H, nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        S = k.shape[2] if keep is None else int(keep[b].sum())
        for h in range(H):
            for t in range(nq):
                p = S * torch.sigmoid(v_p @ torch.tanh(W_p @ q[b, h, t]))
                window = [s for s in range(k.shape[2]) if abs(s - p) <= D
                          and (keep is None or keep[b, s])]
                if not window:
                    continue
                scores = torch.stack([scale * q[b, h, t] @ k[b, h, s] for s in window])
                align = torch.exp(scores - scores.max())
                align = align / align.sum()
                for a, s in zip(align, window, strict=True):
                    out[b, h, t] += a * math.exp(-(s - p) ** 2 / (2 * (D / 2) ** 2)) * v[b, h, s]
    return out


@settings(max_examples=25)
@given(nq=st.integers(1, 10), nk=st.integers(1, 12), D=st.integers(1, 5),
       padded=st.booleans(), chunk=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_predictive_equals_eq_9_10(nq, nk, D, padded, chunk, seed):
    q, k, v = qkv(nq=nq, nk=nk, seed=seed)
    m = predictive(window=D, chunk_size=chunk, seed=seed)
    keep = None
    if padded:  # right padding: row 1 keeps its first few keys
        keep = torch.ones(2, nk, dtype=torch.bool)
        keep[1, 1 + seed % nk:] = False
    mask = None if keep is None else keep[:, None, None, :]
    out = m(q, k, v, attn_mask=mask)
    want = eq_9_10(q, k, v, m.W_p.detach(), m.v_p.detach(), D, 0.5, keep)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(predictive_reference(q, k, v, mech=m, scale=None,
                                                    is_causal=False, attn_mask=mask), want)


def test_predictive_weights_outside_the_window_are_exactly_zero():
    q, k, v = qkv(nq=10, nk=16)
    m = predictive(window=3, chunk_size=4)
    out, w = m(q, k, v, need_weights=True)
    p = m.positions(q, 16)
    dist = torch.arange(16, dtype=torch.float64) - p[..., None]
    assert (w[dist.abs() > 3] == 0).all() and (w[dist.abs() <= 3] > 0).all()
    torch.testing.assert_close(out, w @ v)
    # The Gaussian comes after the softmax: rows sum to less than 1.
    assert (w.sum(-1) < 1).all() and (w.sum(-1) >= math.exp(-2) - 1e-12).all()


def test_positions_stay_in_zero_to_S_and_follow_each_rows_source_length():
    m = predictive(window=2)
    q = 50 * rand(2, 2, 40, 4, seed=3)  # saturates tanh and sigmoid both ways
    p = m.positions(q, 7)
    assert (p >= 0).all() and (p <= 7).all() and p.min() < 0.5 and p.max() > 6.5
    # S of a padded row is its real keys: a padded batch row equals the unpadded call.
    q, k, v = qkv(nq=5, nk=9)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 4:] = False
    out = m(q, k, v, attn_mask=keep[:, None, None, :])
    torch.testing.assert_close(out[1:], m(q[1:], k[1:, :, :4], v[1:, :, :4]))


def test_gradient_reaches_W_p_and_v_p():
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=1, nq=3, nk=5, d=3))
    m = predictive(d=3, window=5)  # D >= Nk: no window edge inside the source
    m(q, k, v).square().sum().backward()
    assert m.W_p.grad.abs().sum() > 0 and m.v_p.grad.abs().sum() > 0
    W_p, v_p = (p.detach().clone().requires_grad_() for p in (m.W_p, m.v_p))
    torch.autograd.gradcheck(
        lambda q, k, v, W_p, v_p: torch.func.functional_call(m, {"W_p": W_p, "v_p": v_p},
                                                             (q, k, v)),
        (q, k, v, W_p, v_p))


def test_no_query_by_key_tensor():
    q, k, v = qkv(B=1, H=1, nq=256, nk=256, d=4, dtype=torch.float32)
    for m in (monotonic(window=3, chunk_size=32).float(), predictive(window=3).float()):
        with LargestTensor() as seen:
            m(q, k, v)
        assert seen.largest < 256 * 256 // 4, (m.spec.name, seen.largest)


@pytest.mark.parametrize("name,hp,exc,match", [
    ("luong_monotonic", {"window": -1}, ValueError, "'window' must be >= 0; got -1"),
    ("luong_predictive", {"window": 0}, ValueError, "'window' must be >= 1; got 0"),
    ("luong_monotonic", {"window": 1.5}, TypeError, "'window' must be an int; got float"),
    ("luong_predictive", {"window": True}, TypeError, "'window' must be an int; got bool"),
    ("luong_monotonic", {"align": "scale"}, ValueError, "did you mean 'scaled'"),
    ("luong_predictive", {"hidden_dim": 0}, ValueError, "'hidden_dim' must be >= 1"),
])
def test_bad_hparams_are_refused(name, hp, exc, match):
    extra = {"head_dim": 4} if name == "luong_predictive" else {}
    with pytest.raises(exc, match=match):
        attnlab.create(name, **extra, **hp)


def test_predictive_refuses_another_head_dim_and_causal():
    q, k, v = qkv(d=4)
    with pytest.raises(ValueError, match="q head dim 4 does not match head_dim=8"):
        predictive(d=8)(q, k, v)
    with pytest.raises(ValueError, match="luong_predictive has no causal form"):
        predictive()(q, k, v, is_causal=True)


# ---------------------------------------------------------------- seq2seq
SMALL = dict(d_model=16, num_heads=2, num_layers=1, dropout=0.0)
TINY = {"window": 2}


def s2s(cross, **kw):
    torch.manual_seed(0)
    return Seq2SeqTransformer(8, 8, cross_mechanism=cross, cross_mechanism_kwargs=TINY,
                              max_len=10, **{**SMALL, **kw})


@pytest.mark.parametrize("cross", ["luong_predictive", "luong_monotonic"])
def test_seq2seq_with_luong_cross_attention_trains_and_decodes(cross):
    src, tgt = seq2seq_task(16, task="copy", min_len=3, max_len=6, vocab=8, seed=0)
    b = collate(src, tgt)
    m = s2s(cross)
    assert m.decoder.layers[0].cross_attn.spec.name == cross
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        logits = m(b["src"], b["tgt_in"], b["src_padding_mask"], b["tgt_padding_mask"])
        loss = F.cross_entropy(logits.flatten(0, 1), b["tgt_out"].flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    if cross == "luong_predictive":
        assert m.decoder.layers[0].cross_attn.attn.W_p.grad.abs().sum() > 0
    out = m.greedy_decode(b["src"], 7, BOS, EOS, b["src_padding_mask"])
    assert out.shape[0] == 16 and (out[:, 0] == BOS).all() and out.max() < 8
    # Decoding agrees with the teacher-forced forward on its own output: position t's
    # argmax is token t + 1 (a cross-attention fed one query per step, not knowing its
    # index, would break this for local-m).
    assert not m.can_cache()
    m.eval()
    with torch.no_grad():
        pred = m(b["src"], out[:, :-1], b["src_padding_mask"]).argmax(-1)
    live = torch.cat([torch.ones(16, 1, dtype=torch.bool),
                      (out[:, 1:-1] != EOS).cumprod(1).bool()], 1)
    assert torch.equal(pred[live], out[:, 1:][live])


def test_seq2seq_luong_cross_attention_is_padding_invariant():
    m = s2s("luong_predictive").double().eval()
    src = torch.randint(3, 8, (2, 7), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(3, 8, (2, 5), generator=torch.Generator().manual_seed(1))
    src_pad = torch.zeros(2, 7, dtype=torch.bool)
    src_pad[1, 3:] = True
    batch = m(src, tgt, src_pad)
    torch.testing.assert_close(batch[1:], m(src[1:, :3], tgt[1:]), rtol=1e-9, atol=1e-9)


def test_use_cache_names_the_cross_mechanism():
    with pytest.raises(ValueError, match="cross_mechanism 'luong_monotonic' cannot decode"):
        s2s("luong_monotonic").greedy_decode(torch.ones(1, 3, dtype=torch.long), 2, BOS, EOS,
                                             use_cache=True)


def test_the_seq2seq_task_takes_cross_mechanism_as_a_model_option(tmp_path):
    cls = get_task("seq2seq")
    mk = {**SMALL, "cross_mechanism": "luong_predictive", "cross_mechanism_kwargs": TINY}
    task = cls(cls.make_config(model_kwargs=mk, task_kwargs={"n_train": 8, "max_len": 5}))
    model = task.build_model()
    layer = model.decoder.layers[0]
    assert layer.cross_attn.spec.name == "luong_predictive" and layer.cross_attn.attn.hp[
        "window"] == 2 and layer.self_attn.spec.name == "sdpa"
    assert cls(cls.make_config()).build_model().decoder.layers[0].cross_attn.spec.name == "sdpa"
    with pytest.raises(ConfigError, match="cross_mechanism is a model option"):
        cls(cls.make_config(task_kwargs={"cross_mechanism": "luong_predictive"}))
    with pytest.raises(ValueError, match="has no cross form"):
        cls(cls.make_config(model_kwargs={"cross_mechanism": "sliding_window"})).build_model()
    with pytest.raises(ConfigError, match="did you mean 'cross_mechanism'"):
        cls(cls.make_config(model_kwargs={"cross_mechanim": "dot"})).build_model()
    args = ["train", "--task", "seq2seq", "--max-steps", "2", "--no-progress", "--run-dir",
            str(tmp_path / "r"), "--set", "eval_every=2", "--set", "eval_batches=1"]
    args += [f"--task-opt={o}" for o in ("n_train=32", "n_validation=8", "n_test=8",
                                          "max_len=4")]
    args += [f"--model-opt={o}" for o in ("d_model=16", "num_heads=2", "num_layers=1",
                                           "cross_mechanism=luong_predictive")]
    assert main(args) == 0
