"""Transformer-XL: the memory equals attending over the earlier segments (against a plain
float64 re-implementation), no gradient enters the memory, the relative term depends on
i - j only and matches a loop over the paper's four terms, and task ``wikitext2_xl``
trains with its memory carried, evaluates every memory length and resumes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from corpora import write_wikitext
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab.tasks.transformer_xl  # noqa: F401  (registers wikitext2_xl)
from attnlab.cli.main import main
from attnlab.models.blocks import sinusoidal_table
from attnlab.models.transformer_xl import RelativeAttention, TransformerXL
from attnlab.tasks import get_task
from attnlab.train.config import ConfigError
from attnlab.train.loop import load_trained, train

pytestmark = pytest.mark.usefixtures("one_thread")
V, D, H = 23, 8, 2


def make(attention="relative", layers=2, mem_len=6, **kw):
    torch.manual_seed(0)
    m = TransformerXL(V, attention=attention, d_model=D, num_heads=H, num_layers=layers,
                      dropout=0.0, max_len=64, mem_len=mem_len, **kw)
    return m.double().eval()


# ------------------------------------------------------- a plain float64 re-implementation

def _ln(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _rotate(x, positions, base=10000.0):
    """RoPE, rotate-half pairing, written out: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    ang = positions.double()[:, None] * theta
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)


def _heads(x):
    return x.view(x.shape[0], x.shape[1], H, D // H).transpose(1, 2)


def _ref_scores(attn, c, relative: bool):
    """(B, H, L, L) scores of every pair of the whole sequence ``c`` (positions 0..L-1)."""
    L = c.shape[1]
    if not relative:
        pos = torch.arange(L)
        q = _rotate(_heads(c @ attn.q_proj.weight.T + attn.q_proj.bias), pos)
        k = _rotate(_heads(c @ attn.k_proj.weight.T + attn.k_proj.bias), pos)
        return q @ k.transpose(-1, -2)
    q, k = _heads(c @ attn.q_proj.weight.T), _heads(c @ attn.k_proj.weight.T)
    R = sinusoidal_table(L, D).double()
    s = torch.zeros(c.shape[0], H, L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(i + 1):
            r = _heads((R[i - j] @ attn.r_proj.weight.T)[None, None])[:, :, 0]  # W_{k,R} R_{i-j}
            s[:, :, i, j] = ((q[:, :, i] * k[:, :, j]).sum(-1) + (q[:, :, i] * r).sum(-1)
                             + (attn.u * k[:, :, j]).sum(-1) + (attn.v * r).sum(-1))
    return s


def reference_logits(model, ids, allowed, relative: bool):
    """The model's equations over the whole sequence ``ids`` with the (L, L) mask ``allowed``."""
    h = model.embed.weight[ids] * math.sqrt(D)
    for layer in model.layers:
        a = layer.attn
        c = _ln(h, layer.norm1)
        s = (_ref_scores(a, c, relative) / math.sqrt(D // H)).masked_fill(~allowed, -math.inf)
        bias = 0 if relative else a.v_proj.bias
        out = torch.softmax(s, -1) @ _heads(c @ a.v_proj.weight.T + bias)
        h = h + out.transpose(1, 2).reshape(h.shape) @ a.out_proj.weight.T + a.out_proj.bias
        f1, f2 = layer.ff[0], layer.ff[3]
        h = h + F.gelu(_ln(h, layer.norm2) @ f1.weight.T + f1.bias) @ f2.weight.T + f2.bias
    return _ln(h, model.norm) @ model.embed.weight.T


def memory_allowed(L: int, N: int, M: int) -> torch.Tensor:
    """Query i of segment s (starting at sN) sees keys j <= i not older than sN - M."""
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    return (j <= i) & (j >= (i // N) * N - M)


@pytest.mark.parametrize("attention", ["relative", "sdpa"])
@pytest.mark.parametrize("N, M, segments", [(5, 5, 2), (6, 3, 2), (4, 8, 3), (4, 0, 2)])
def test_segments_with_memory_equal_the_masked_whole_sequence(attention, N, M, segments):
    """Segment s with the memory of the earlier ones = the whole sequence with query i seeing
    keys j <= i back to M before its segment. Exact where every layer's memory holds states
    computed as in the whole run: M <= N for two segments, M >= all of them for three."""
    model = make(attention, mem_len=M)
    ids = torch.randint(0, V, (2, N * segments), generator=torch.Generator().manual_seed(1))
    want = reference_logits(model, ids, memory_allowed(ids.shape[1], N, M),
                            attention == "relative")
    mems, got = None, []
    for s in range(segments):
        logits, mems = model(ids[:, s * N:(s + 1) * N], mems)
        got.append(logits)
        assert all(m.shape == (2, min(M, (s + 1) * N), D) for m in mems)
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=0, atol=1e-10)


def test_without_memory_the_model_is_the_causal_reference():
    model = make("sdpa")
    ids = torch.randint(0, V, (1, 9))
    L = ids.shape[1]
    want = reference_logits(model, ids, torch.ones(L, L).tril().bool(), relative=False)
    torch.testing.assert_close(model(ids)[0], want, rtol=0, atol=1e-10)


# ------------------------------------------------------------- the memory takes no gradient

def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_no_gradient_flows_into_the_memory():
    model = make()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    seg1, seg2 = ids[:, :6], ids[:, 6:]
    _, mems = model(seg1)
    assert all(m.grad_fn is None and not m.requires_grad for m in mems)
    # Leaves that would take a gradient: the model stops it (the paper's SG).
    leaves = [m.clone().requires_grad_() for m in mems]
    with_mem = _grads(model, model(seg2, leaves)[0].sum())
    assert all(m.grad is None for m in leaves)
    # Segment 1 computed without autograd at all: the same gradients, to the bit.
    with torch.no_grad():
        _, const = model(seg1)
    assert_same = [torch.equal(with_mem[k], g) for k, g in
                   _grads(model, model(seg2, const)[0].sum()).items()]
    assert all(assert_same) and len(assert_same) == len(with_mem)
    # The whole sequence back-propagates into segment 1's states: different gradients.
    whole = _grads(model, model(ids)[0][:, 6:].sum())
    assert any(not torch.allclose(whole[k], with_mem[k]) for k in with_mem)


# ------------------------------------------------------------------- relative positions

@settings(max_examples=15)
@given(n=st.integers(1, 5), m=st.integers(0, 5), heads=st.sampled_from([1, 2]))
def test_relative_scores_equal_a_loop_over_the_four_terms(n, m, heads):
    torch.manual_seed(n * 7 + m)
    d = 4 * heads
    attn = RelativeAttention(d, heads).double()
    c = torch.randn(2, m + n, d, dtype=torch.float64)
    got = attn.scores(c[:, m:], c)
    Wq, Wk, Wr = attn.q_proj.weight, attn.k_proj.weight, attn.r_proj.weight
    R = sinusoidal_table(m + n, d).double()
    dh = d // heads
    for i in range(n):
        for j in range(m + i + 1):  # the allowed keys of query i (position m + i)
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                q, k = (c[:, m + i] @ Wq.T)[:, sl], (c[:, j] @ Wk.T)[:, sl]
                r = (R[m + i - j] @ Wr.T)[sl]
                a, b = (q * k).sum(-1), (q * r).sum(-1)
                cc, dd = (attn.u[h] * k).sum(-1), (attn.v[h] * r).sum(-1)
                torch.testing.assert_close(got[:, h, i, j], a + b + cc + dd, rtol=0,
                                           atol=1e-12)


def test_relative_scores_are_shift_invariant():
    """The same content at the same distance scores the same wherever it sits: a context
    that repeats itself with period P gives S[i, j] = S[i + P, j + P]."""
    torch.manual_seed(3)
    attn = RelativeAttention(8, 2).double()
    P, m = 4, 3
    c = torch.randn(1, P, 8, dtype=torch.float64).repeat(1, 3, 1)  # length 12
    S = attn.scores(c[:, m:], c)  # queries at positions m..11
    for i in range(S.shape[2] - P):
        for j in range(m + i + 1):
            torch.testing.assert_close(S[:, :, i + P, j + P], S[:, :, i, j], rtol=0, atol=1e-12)
    # ... and content matters: the scores are not a function of i - j alone.
    assert not torch.allclose(S[:, :, 1, 0], S[:, :, 2, 1])


# ----------------------------------------------------------------------- bad model input

def test_model_refuses_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="arbitrary_mask"):
        make("linear")
    with pytest.raises(ValueError, match="did you mean"):
        make("sdpaa")
    with pytest.raises(ValueError, match="mechanism_kwargs"):
        make("relative", mechanism_kwargs={"x": 1})
    with pytest.raises(ValueError, match="mem_len"):
        make(mem_len=-1)
    model = make(mem_len=4)
    ids = torch.randint(0, V, (2, 5))
    _, mems = model(ids)
    with pytest.raises(TypeError, match="ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="one .* per layer"):
        model(ids, mems[:1])
    with pytest.raises(ValueError, match=r"mems\[1\] must be \(2, M, 8\)"):
        model(ids, [mems[0], mems[1][:, :2]])
    with pytest.raises(TypeError, match="float64"):
        model(ids, [m.float() for m in mems])
    torch.testing.assert_close(model(ids, num_logits=2)[0], model(ids)[0][:, -2:], rtol=0,
                               atol=1e-12)
    with pytest.raises(ValueError, match="num_logits"):
        model(ids, num_logits=6)
    with pytest.raises(ValueError, match="exceed max_len=64"):
        model(torch.randint(0, V, (2, 62)), mems)


# ------------------------------------------------------------------------------ the task




TINY = {"d_model": 16, "num_heads": 2, "num_layers": 1}


def xl_config(tmp_path, steps=6, model_kwargs=None, **task_kwargs):
    write_wikitext(tmp_path)
    opts = {"data_dir": str(tmp_path), "tokenizer": "word", "vocab_size": None, "max_len": 8,
            "eval_batch_size": 4, **task_kwargs}
    return get_task("wikitext2_xl").make_config(
        max_steps=steps, eval_every=steps, warmup_steps=1, batch_size=4, lr=3e-3,
        model_kwargs=TINY if model_kwargs is None else model_kwargs, task_kwargs=opts,
        eval_batches=3)


def weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]


def test_task_trains_and_reports_every_memory_length(tmp_path):
    cfg = xl_config(tmp_path, eval_mem_len=[0, 4, 16], mem_len=4)
    r = train(cfg, tmp_path / "run", progress=False)
    assert r.status == "done"
    row = json.loads((r.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for m in (0, 4, 16):
        assert math.isfinite(row[f"val_perplexity_mem{m}"])
    assert row["val_perplexity"] == row["val_perplexity_mem4"]  # the training mem_len
    assert {"perplexity_mem0", "perplexity_mem16", "word_perplexity"} <= set(r.test)
    task, model = load_trained(r.run_dir)
    assert isinstance(model, TransformerXL) and model.mem_len == 4
    assert model.max_len == 8 + 16  # the segment and the longest evaluated memory


def test_training_carries_the_memory_from_batch_to_batch(tmp_path):
    cfg = xl_config(tmp_path, mem_len=8, eval_mem_len=8)
    task = get_task("wikitext2_xl")(cfg, None)
    task.setup()
    model = task.build_model()
    batches = task.train_batches(0)
    task.loss(model, batches[0])
    first = task._train_memory
    assert first["mems_in"] is None and first["mems_out"][0].shape == (4, 8, 16)
    task.loss(model, batches[1])
    assert task._train_memory["mems_in"] is first["mems_out"]
    again = task._train_memory
    task.loss(model, batches[1])  # a regime asking for the same batch twice
    assert task._train_memory["mems_in"] is again["mems_in"]
    task.loss(model, batches[5])  # not the next batch (a resume): no memory
    assert task._train_memory["mems_in"] is None


@pytest.mark.parametrize("mem_len", [0, 8])
def test_resume(tmp_path, mem_len):
    """Without memory a resumed run ends bitwise as the uninterrupted one (the loop's
    guarantee); with memory it finishes too, but differs: the memory restarts empty."""
    cfg = xl_config(tmp_path, steps=6, mem_len=mem_len, eval_mem_len=mem_len)
    train(cfg, tmp_path / "whole", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_after=3)
    assert part.status == "interrupted" and part.step == 3
    resumed = train(cfg, tmp_path / "part", progress=False, resume=True)
    assert resumed.status == "done" and resumed.step == 6
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "part")
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same == (mem_len == 0)


@pytest.mark.parametrize("layers", [1, 2])
def test_cached_vs_recomputed_evaluation(tmp_path, layers):
    """One layer: its memory is the previous tokens' embeddings, so the cached and the
    recomputed evaluation agree; two layers: the cache holds states that saw older context."""
    cfg = xl_config(tmp_path, mem_len=4, eval_mem_len=4,
                    model_kwargs={**TINY, "num_layers": layers})
    task = get_task("wikitext2_xl")(cfg, None)
    task.setup()
    model = task.build_model().double()
    res = task.cached_vs_recomputed(model, "validation", max_batches=6)
    assert res["segments"] == 6 and res["time_cached_s"] > 0 and res["speedup"] > 0
    equal = math.isclose(res["perplexity_cached"], res["perplexity_recomputed"], rel_tol=1e-10)
    assert equal == (layers == 1)
    # Memory 0: both are the segment alone.
    zero = task.cached_vs_recomputed(model, "validation", mem_len=0, max_batches=3)
    assert math.isclose(zero["perplexity_cached"], zero["perplexity_recomputed"], rel_tol=1e-10)


@pytest.mark.parametrize("overrides, match", [
    ({"task_kwargs": {"eval_mem_len": "a,b"}}, "eval_mem_len"),
    ({"task_kwargs": {"eval_mem_len": [-1]}}, "eval_mem_len"),
    ({"task_kwargs": {"eval_mem_len": []}}, "eval_mem_len"),
    ({"task_kwargs": {"mem_len": -2}}, "mem_len"),
    ({"task_kwargs": {"attention": "absolute"}}, "attention must be one of"),
    ({"mechanism": "linear"}, "attention='relative' uses no registered mechanism"),
    ({"model_kwargs": {"positions": "rope"}}, "unknown model option"),
    ({"model": "transformer"}, "model must be one of"),
])
def test_bad_options_are_refused(tmp_path, overrides, match):
    cls = get_task("wikitext2_xl")
    kw = {**overrides, "task_kwargs": {"data_dir": str(tmp_path),
                                       **overrides.get("task_kwargs", {})}}
    with pytest.raises(ConfigError, match=match):
        cls(cls.make_config(**kw), None)


def test_cli_trains_rope_attention_with_a_mechanism(tmp_path, capsys):
    write_wikitext(tmp_path)
    args = ["train", "--task", "wikitext2_xl", "--data-dir", str(tmp_path), "--max-steps", "2",
            "--batch-size", "4", "--no-progress", "--run-dir", str(tmp_path / "cli"),
            "--mechanism", "sdpa", "--task-opt", "attention=rope", "--task-opt", "max_len=8",
            "--task-opt", "tokenizer=word", "--task-opt", "vocab_size=null",
            "--task-opt", "eval_mem_len=0,8", "--model-opt", "d_model=16",
            "--model-opt", "num_layers=1", "--set", "eval_every=2", "--set", "eval_batches=2"]
    assert main(args) == 0
    summary = json.loads(next((tmp_path / "cli").rglob("summary.json")).read_text())
    assert {"perplexity_mem0", "perplexity_mem8"} <= set(summary["test"])
    seed_dir = next((tmp_path / "cli").rglob("config.json")).parent
    capsys.readouterr()
    assert main(["generate", str(seed_dir), "--max-new-tokens", "2"]) == 2
    assert "does not sample text" in capsys.readouterr().err
    bad = args[:-4] + ["--mechanism", "linear"]
    bad[bad.index("--run-dir") + 1] = str(tmp_path / "bad")
    assert main(bad) == 2
    assert "arbitrary_mask" in capsys.readouterr().err
