"""Context-parallel training: P processes, each on its shard of every sequence, train as one.

Evidence:

* one process, P ranks as threads around an in-memory ring (the ring engine's own tiles,
  forward and backward; only its transport swapped): a DecoderLM given each rank's shard
  and its global positions computes exactly the rows of the full forward, and the ranks'
  gradients add up to the full one (float64, over P = 1..4, the three layouts, sinusoidal /
  learned / no positions, hypothesis);
* the refusals, with their messages: a mechanism other than ring, a task that is not a
  language model (a classifier, an answer task), another regime, RoPE, a layer of another
  mechanism, a length that does not cut; bad ``positions`` arguments;
* a short batch is padded after its real tokens (targets ``-100``), every rank keeps one;
* a real 2-process job (torchrun, gloo, loopback, bounded by a timeout): 5 steps of
  ``--context-parallel`` on WikiText-2 files generated here (one short batch on the way)
  equal one process training ring attention at the same global batch (dropout 0): weights
  within float32 rounding, the logged train loss, rank 0's evaluations (whole sequences of
  a length that does not cut: rank 0 alone) and test metrics; each rank's model saw its
  shards at the layout's positions with the ring over 2 ranks, only rank 0 evaluated;
* ``attnlab train --nproc 2 --context-parallel`` end to end ends with the same weights;
  a refusal exits 2 before any process starts.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf
from corpora import write_wikitext
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab.mechanisms.ring  # noqa: F401
from attnlab.cli.main import main as cli_main
from attnlab.mechanisms._engines import ring as engine
from attnlab.mechanisms.ring import RingAttention, positions, unshard
from attnlab.models.blocks import TokenEmbedding
from attnlab.models.lm import DecoderLM
from attnlab.train import context
from attnlab.train.checkpoint import load_checkpoint
from attnlab.train.config import ConfigError, TrainConfig
from attnlab.train.context import IGNORE, ContextParallel, check_config
from attnlab.train.distributed import Dist
from attnlab.train.loop import train
from attnlab.train.task import get_task

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("zigzag", "striped", "contiguous")
TIMEOUT = 100  # seconds for one job; a hang fails the test instead of the suite
# RoPE: the real jobs check that the layers rotate each shard at its global positions.
MODEL = {"d_model": 16, "num_layers": 2, "num_heads": 2, "dropout": 0.0,
         "positions": "rope"}
STEPS, EVAL_EVERY, MAX_LEN, BATCH = 5, 3, 12, 4


# ---- P ranks in one process: threads around an in-memory ring -----------------------------
class ThreadGroup:
    """Rank ``rank`` of ``P`` threads; ``boxes[(rank, tag)]`` its incoming messages."""

    def __init__(self, rank, P, boxes):
        self.rank, self.P, self.boxes = rank, P, boxes


class ThreadRing:
    """The engine's ``_Ring`` with queues for transport (FIFO per receiver and tag)."""

    def __init__(self, group, stats):
        self.group, self.stats = group, stats
        self.rank, self.P = (0, 1) if group is None else (group.rank, group.P)

    def pass_on(self, t, tag):
        self.group.boxes[(self.rank + 1) % self.P, tag].put(t.clone())
        return self.rank, tag

    def wait(self, pending):
        return self.group.boxes[pending].get(timeout=30)


def rank_forward(model, ids, y, layout, rank, P, boxes):
    """Rank ``rank``'s logits on its shard and its parameters' gradients of its summed NLL."""
    at = positions(layout, rank, P, ids.shape[1] // P)
    for m in model.modules():
        if isinstance(m, RingAttention):
            m.process_group = ThreadGroup(rank, P, boxes)
    logits = model(ids[:, at], positions=at)
    nnf.cross_entropy(logits.flatten(0, 1), y[:, at].flatten(), reduction="sum").backward()
    return logits.detach(), [p.grad for p in model.parameters()]


@settings(max_examples=20, deadline=None)
@given(P=st.integers(1, 4), layout=st.sampled_from(LAYOUTS),
       pos=st.sampled_from(["sinusoidal", "learned", "none", "rope"]), units=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_shards_at_their_positions_are_the_rows_of_the_full_forward(P, layout, pos, units,
                                                                     seed):
    check_sharded_forward(P, layout, pos, units, seed)


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_rotates_each_shard_at_its_global_positions(P, layout):
    """RoPE acts inside attention: rotated at 0 .. n-1 on every shard, the ring's scores
    would be q_m . k_n at the wrong distances and these rows would differ."""
    check_sharded_forward(P, layout, "rope", 2, P)


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_alibi_biases_each_shard_at_its_global_distances(P, layout):
    """ring(alibi=True) in a model with positions="none": the shards' rows and gradients
    are the whole sequence's (ALiBi's -m_h (i - j) at the global positions)."""
    check_sharded_forward(P, layout, "none", 2, P, alibi=True)


def test_ring_alibi_is_the_layers_alibi():
    """One process: ring's own ALiBi equals the layer's (positions="alibi", a dense bias
    mask with sdpa) on the same weights; without it the logits differ."""
    torch.manual_seed(0)
    layer = DecoderLM(11, mechanism="sdpa", d_model=8, num_heads=2, num_layers=2,
                      dropout=0.0, positions="alibi", max_len=16).double()
    ring = DecoderLM(11, mechanism="ring", mechanism_kwargs={"alibi": True, "block_size": 3},
                     d_model=8, num_heads=2, num_layers=2, dropout=0.0, positions="none",
                     max_len=16).double()
    ring.load_state_dict(layer.state_dict())
    ids = torch.randint(11, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ring(ids), layer(ids), rtol=0, atol=1e-10)
    plain = DecoderLM(11, mechanism="ring", d_model=8, num_heads=2, num_layers=2,
                      dropout=0.0, positions="none", max_len=16).double()
    plain.load_state_dict(layer.state_dict())
    assert not torch.allclose(plain(ids), layer(ids))


def check_sharded_forward(P, layout, pos, units, seed, **hp):
    N, V = engine.layout_unit(layout, P) * units, 11
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DecoderLM(V, mechanism="ring", mechanism_kwargs={"layout": layout,
                                                             "block_size": 3, **hp},
                      d_model=8, num_heads=2, num_layers=2, dropout=0.0, positions=pos,
                      max_len=N + 5).double()
    ids, y = torch.randint(V, (2, N), generator=g), torch.randint(V, (2, N), generator=g)
    full = model(ids)
    nnf.cross_entropy(full.flatten(0, 1), y.flatten(), reduction="sum").backward()
    boxes = {(r, tag): queue.Queue() for r in range(P) for tag in (engine._KV, engine._GRAD)}
    copies = [copy.deepcopy(model) for _ in range(P)]
    for m in copies:
        m.zero_grad(set_to_none=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "_Ring", ThreadRing)
        mp.setattr(RingAttention, "world", lambda self: (self.process_group.rank,
                                                         self.process_group.P))
        with ThreadPoolExecutor(P) as pool:
            jobs = [pool.submit(rank_forward, copies[r], ids, y, layout, r, P, boxes)
                    for r in range(P)]
            res = [j.result(timeout=60) for j in jobs]
    torch.testing.assert_close(unshard([r[0] for r in res], layout), full.detach(),
                               rtol=0, atol=1e-10)
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(sum(r[1][i] for r in res), p.grad, rtol=0, atol=1e-10)


def test_positions_given_as_0_to_n_are_the_default_and_bad_ones_are_refused():
    emb = TokenEmbedding(7, 4, "learned", max_len=8, dropout=0.0)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(emb(ids, positions=torch.arange(3)), emb(ids), rtol=0, atol=0)
    torch.testing.assert_close(emb(ids, positions=torch.tensor([5, 0, 7])),
                               emb(ids) - emb.learned[:3] + emb.learned[[5, 0, 7]])
    for bad, msg in ((torch.tensor([0.0, 1, 2]), "int64 .* got torch.float32"),
                     (torch.arange(4), r"must have shape \(3,\)"),
                     (torch.tensor([0, 1, 8]), r"values in \[0, 8\).*range \[0, 8\]"),
                     (torch.tensor([-1, 1, 2]), r"range \[-1, 2\]")):
        with pytest.raises((TypeError, ValueError), match=msg):
            emb(ids, positions=bad)
    with pytest.raises(ValueError, match="offset must be 0"):
        emb(ids, 2, torch.arange(3))
    rope = DecoderLM(7, mechanism="ring", d_model=8, num_heads=2, num_layers=1,
                     positions="rope", max_len=8, dropout=0.0)
    torch.testing.assert_close(rope(ids, positions=torch.arange(3)), rope(ids), rtol=0, atol=0)
    alibi = DecoderLM(7, mechanism="sdpa", d_model=8, num_heads=2, num_layers=1,
                      positions="alibi", max_len=8)
    with pytest.raises(ValueError, match="positions='alibi', a bias by the distance.*use rope"):
        alibi(ids, positions=torch.arange(3))


# ---- configuration, refusals, the sharing of a batch ---------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """WikiText-2 files: 120 training tokens, 4 rows of 30: batches of 12, 12 and 5."""
    return write_wikitext(tmp_path_factory.mktemp("wiki"), sizes=(12, 4, 4))


def wiki_cfg(data, **kw):
    task_kwargs = {"data_dir": str(data), "download": False, "tokenizer": "word",
                   "vocab_size": None, "max_len": MAX_LEN, "eval_batch_size": 4,
                   **kw.pop("task_kwargs", {})}
    base = dict(mechanism="ring", mechanism_kwargs={"block_size": 4}, max_steps=STEPS,
                batch_size=BATCH, eval_every=EVAL_EVERY, warmup_steps=1, lr=3e-3,
                task_kwargs=task_kwargs, model_kwargs=dict(MODEL))
    return get_task("wikitext2").make_config(**{**base, **kw})


def attached(cfg, rank, P):
    """Rank ``rank``'s :class:`ContextParallel` of ``P``, without a job (no groups)."""
    task = get_task(cfg.task)(cfg)
    task.setup()
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(context, "_groups", lambda P: (None, None))
        return ContextParallel(cfg, Dist(rank, P)).attach(task.build_model(), task)


def test_the_config_field(data):
    assert TrainConfig(task="wikitext2").context_parallel is False
    cfg = wiki_cfg(data, context_parallel=True)
    assert cfg.to_dict()["context_parallel"] is True
    old = {k: v for k, v in cfg.to_dict().items() if k != "context_parallel"}
    assert TrainConfig.from_dict(old).context_parallel is False
    with pytest.raises(ConfigError, match="context_parallel must be a bool; got 'yes'"):
        cfg.replace(context_parallel="yes")
    # a batch the processes could not split by rows is fine: every rank takes all rows
    assert Dist(0, 3).check(cfg) == torch.device("cpu")


@pytest.mark.parametrize(("change", "msg"), [
    ({"mechanism": "sdpa"}, "pass --mechanism ring; got mechanism 'sdpa'"),
    ({"task": "text_bytes"}, "task 'text_bytes' is of kind 'classification'"),
    ({"task": "copy"}, "task 'copy' is of kind 'sequence'"),
    ({"regime": "adversarial"}, "standard regime only; got regime 'adversarial'"),
])
def test_what_cannot_be_sharded_is_refused_before_setup(data, change, msg):
    cfg = wiki_cfg(data, context_parallel=True).to_dict()
    if "task" in change:
        cfg.update(task_kwargs={}, model_kwargs={})
    cfg = TrainConfig.from_dict({**cfg, **change})
    with pytest.raises(ConfigError, match=msg):
        check_config(cfg)
    with pytest.raises(ConfigError, match=msg):
        ContextParallel(cfg, Dist())


@pytest.mark.parametrize(("change", "msg"), [
    ({"task_kwargs": {"max_len": 10}}, "layout 'zigzag' cuts the sequence into 2P = 4 equal "
     "chunks; N = 10 is not a multiple of 4.*--task-opt max_len"),
    ({"model_kwargs": {**MODEL, "layer_mechanisms": ["ring", "sdpa"]}},
     r"every attention layer must be ring .*\['sdpa'\]"),
])
def test_what_the_model_or_its_batches_cannot_shard_is_refused(data, change, msg):
    with pytest.raises(ConfigError, match=msg):
        attached(wiki_cfg(data, context_parallel=True, **change), 0, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_short_batch_is_padded_after_its_tokens(data, layout):
    cfg = wiki_cfg(data, context_parallel=True, mechanism_kwargs={"layout": layout})
    batch = {"x": torch.arange(20).reshape(4, 5), "y": torch.arange(20).reshape(4, 5) + 100}
    cps = [attached(cfg, r, 2) for r in (0, 1)]
    parts = [cp.share(batch) for cp in cps]
    padded = 8 if layout == "zigzag" else 6  # a multiple of 2P chunks, or of P shards
    for cp, part in zip(cps, parts, strict=True):
        assert torch.equal(cp.at, positions(layout, cp.rank, 2, padded // 2))
        assert cp.count(part) == int((part["y"] != IGNORE).sum()) > 0
    x, y = (unshard([p[k][..., None] for p in parts], layout)[..., 0] for k in ("x", "y"))
    assert torch.equal(x[:, :5], batch["x"]) and torch.equal(y[:, :5], batch["y"])
    assert (x[:, 5:] == 0).all() and (y[:, 5:] == IGNORE).all() and x.shape == (4, padded)
    assert sum(cp.count(p) for cp, p in zip(cps, parts, strict=True)) == 20
    full = {k: torch.arange(48).reshape(4, 12) for k in ("x", "y")}
    assert [cp.share(full)["x"].shape for cp in cps] == [(4, 6)] * 2  # no padding


def test_a_run_saved_before_the_field_existed_resumes(data, tmp_path):
    cfg = wiki_cfg(data, max_steps=2, eval_every=2)
    assert train(cfg, tmp_path, progress=False, stop_after=1).status == "interrupted"
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["context_parallel"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert train(cfg, tmp_path, progress=False, resume=True).status == "done"


# ---- real jobs ----------------------------------------------------------------------------
def run_job(argv, timeout=TIMEOUT):
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a, b):
    """Equal up to float32 rounding. The key bias is left out: softmax ignores a constant
    added to a row's scores, so its gradient is 0 in exact arithmetic and Adam turns the
    rounding noise it gets into steps of ~lr. Measured after the 5 steps: at most 1.2e-6
    apart (an FFN weight), while rotating each shard at 0 .. n-1 instead of its global
    positions leaves them 2e-2 apart: 1e-5 separates the two by far."""
    assert a.keys() == b.keys()
    for k in a:
        if not k.endswith("k_proj.bias"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def one(data, tmp_path_factory):
    """One process, ring attention (exact over the whole sequence), the same global batch."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = train(wiki_cfg(data), run_dir, progress=False)
    return run_dir, result


@pytest.fixture(scope="module")
def job(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2", __file__, "worker", str(root), str(data)]
    code, out, _ = run_job(argv)
    assert code == 0, out
    return root


def test_two_processes_on_shards_train_as_one_on_whole_sequences(job, one):
    run_dir, result = one
    cp = job / "run"
    assert_same_weights(load_checkpoint(cp / "checkpoint.pt")["model"],
                        load_checkpoint(run_dir / "checkpoint.pt")["model"])
    r2, r1 = rows(cp), rows(run_dir)
    assert [r["step"] for r in r2] == [r["step"] for r in r1] == [3, 5]
    for x, y in zip(r2, r1, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_perplexity"] == pytest.approx(y["val_perplexity"], rel=1e-5)
        # 4 rows of 9: each real target counted once over the two ranks' shards
        assert x["val_tokens"] == y["val_tokens"] == 36
    summary = json.loads((cp / "summary.json").read_text())
    assert summary["test"] == pytest.approx(result.test, rel=1e-5)
    assert json.loads((cp / "config.json").read_text())["context_parallel"] is True


def test_each_rank_saw_its_shards_in_training_and_evaluation(job):
    seen = [json.loads((job / f"calls-rank{r}.json").read_text()) for r in (0, 1)]
    for rank, calls in enumerate(seen):
        steps = [c for c in calls if c["training"]]
        # batches of 12, 12, 5 (padded to 8), 12, 12 tokens: 6, 6, 4, 6, 6 per rank
        assert [c["shape"] for c in steps] == [[BATCH, n] for n in (6, 6, 4, 6, 6)]
        for c in steps:
            assert c["positions"] == positions("zigzag", rank, 2, c["shape"][1]).tolist()
            assert c["ring"] == [rank, 2]
        # Evaluation too: rows of 9 tokens padded to 12, 6 per rank, over the ring.
        evals = [c for c in calls if not c["training"]]
        assert evals and len(evals) == len([c for c in seen[0] if not c["training"]])
        for c in evals:
            assert (c["shape"][1], c["ring"]) == (6, [rank, 2])
            assert c["positions"] == positions("zigzag", rank, 2, 6).tolist()


def test_attnlab_train_nproc_context_parallel_end_to_end(data, one, tmp_path, capsys):
    opts = {"data_dir": str(data), "download": "false", "tokenizer": "word",
            "vocab_size": "null", "max_len": MAX_LEN, "eval_batch_size": 4}
    argv = ["train", "--task", "wikitext2", "--mechanism", "ring", "--mech-opt", "block_size=4",
            "--max-steps", str(STEPS), "--batch-size", str(BATCH), "--lr", "3e-3",
            "--set", f"eval_every={EVAL_EVERY}", "--set", "warmup_steps=1", "--no-progress",
            "--run-dir", str(tmp_path / "cli"), "--nproc", "2", "--context-parallel",
            *[a for k, v in opts.items() for a in ("--task-opt", f"{k}={v}")],
            *[a for k, v in MODEL.items() for a in ("--model-opt", f"{k}={v}")]]
    code, out, _ = run_job([sys.executable, "-m", "attnlab.cli.main", *argv])
    assert code == 0, out
    assert out.count("test perplexity") == 2  # rank 0's summary line and table
    assert_same_weights(load_checkpoint(tmp_path / "cli" / "seed-0" / "checkpoint.pt")["model"],
                        load_checkpoint(one[0] / "checkpoint.pt")["model"])
    sdpa = [a if a != "ring" else "sdpa" for a in argv]
    sdpa[sdpa.index("--run-dir") + 1] = str(tmp_path / "refused")
    assert cli_main(sdpa) == 2  # before any process starts
    assert "pass --mechanism ring" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "refused").exists()


# ---- the job's side: python -m torch.distributed.run ... this file worker ROOT DATA --------
def _worker(root: Path, data: Path) -> None:
    """Train with context parallelism, recording what each call of the model saw."""
    calls, forward = [], DecoderLM.forward

    def recording(self, ids, padding_mask=None, positions=None):
        ring = next(m for m in self.modules() if isinstance(m, RingAttention))
        calls.append({"training": self.training, "shape": list(ids.shape),
                      "positions": None if positions is None else positions.tolist(),
                      "ring": list(ring.world())})
        return forward(self, ids, padding_mask, positions)

    DecoderLM.forward = recording
    train(wiki_cfg(data, context_parallel=True), root / "run", progress=False)
    (root / f"calls-rank{os.environ['RANK']}.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "worker":
        _worker(Path(sys.argv[2]), Path(sys.argv[3]))
