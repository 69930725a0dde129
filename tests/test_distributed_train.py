"""Data-parallel training: P processes at a global batch B train as one process at B.

The multi-process tests start real jobs (gloo, loopback, 2 processes) in subprocesses
bounded by a timeout; this file is also the job's worker script (``__main__`` below).
Dropout is 0 where weights are compared across process counts (each rank draws its own
masks, which one process cannot reproduce) and 0.1 where a resumed job is compared with an
uninterrupted one (each rank's generators are in the checkpoint: bit-identical).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf
from hypothesis import given
from hypothesis import strategies as st

from attnlab.tasks.language import Copy
from attnlab.train.checkpoint import load_checkpoint
from attnlab.train.config import ConfigError
from attnlab.train.distributed import (
    Dist,
    DistributedError,
    Objective,
    env,
    launch,
    loss_count,
    share,
)
from attnlab.train.loop import train
from attnlab.train.regimes import Regime
from attnlab.train.task import get_task, register_task

pytestmark = pytest.mark.usefixtures("one_thread")
IGNORE = -100
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 100  # seconds for one job; a hang fails the test instead of the suite
TINY = {"n_train": 61, "n_validation": 16, "n_test": 16, "length": 6}  # 61: a short last batch
MODEL = {"d_model": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0}


@register_task
class RaggedCopy(Copy):
    """Copy scored on each row's first ``m_i`` answers only (``m_i`` random): a token-mean
    loss over token counts that differ between the ranks."""

    name = "_test_ragged_copy"

    def generate(self, n, seed):
        x, y = super().generate(n, seed)
        g = torch.Generator().manual_seed(seed + 99)
        keep = torch.randint(1, y.shape[1] + 1, (n, 1), generator=g)
        return x, torch.where(torch.arange(y.shape[1]) < keep, y, IGNORE)

    def loss(self, model, batch):
        y = batch["y"]
        logits = self._answer_logits(model, batch["x"], y.shape[1])
        return nnf.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE), \
            batch["x"].numel()

    def loss_count(self, batch):
        return int((batch["y"] != IGNORE).sum())


@register_task
class FailingCopy(Copy):
    """Rank 1 raises at its third step; rank 0 would go on."""

    name = "_test_failing_copy"

    def loss(self, model, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if os.environ.get("RANK") == "1" and self.calls == 3:
            raise RuntimeError("boom on rank 1")
        return super().loss(model, batch)


def ragged_cfg(**kw):
    base = dict(max_steps=8, batch_size=16, eval_every=4, checkpoint_every=3, warmup_steps=2,
                lr=3e-3, task_kwargs=dict(TINY), model_kwargs=dict(MODEL))
    return get_task(kw.pop("task", "_test_ragged_copy")).make_config(**{**base, **kw})


def weights(run_dir, name="checkpoint.pt"):
    return load_checkpoint(Path(run_dir) / name)["model"]


def rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_model(a, b, cfg):
    """Equal weights up to float32 rounding, and equal outputs. The key bias is left out
    of the weights: softmax ignores a constant added to a row's scores, so its gradient is
    0 in exact arithmetic and Adam turns the rounding noise it gets into steps of ~lr."""
    assert a.keys() == b.keys()
    for k in a:
        if not k.endswith("k_proj.bias"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    task = get_task(cfg.task)(cfg)
    task.setup()
    models = [task.build_model() for _ in (a, b)]
    x = task.data["validation"][0]
    for m, w in zip(models, (a, b), strict=True):
        m.load_state_dict(w)
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(models[0](x), models[1](x), rtol=0, atol=1e-5)


def run_job(argv, timeout=TIMEOUT):
    """A subprocess; (return code, stdout + stderr, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


# ---- one process: the sharing of a batch and the weighting of the loss ------------------
@given(n=st.integers(1, 40), world=st.integers(1, 4))
def test_shares_are_the_batch_in_order_and_nearly_equal(n, world):
    batch = {"x": torch.arange(n * 3).reshape(n, 3), "y": torch.arange(n)}
    if n < world:
        with pytest.raises(ConfigError, match=f"batch of {n} rows cannot be shared"):
            share(batch, 0, world)
        return
    parts = [share(batch, r, world) for r in range(world)]
    assert torch.equal(torch.cat([p["y"] for p in parts]), batch["y"])  # once, in order
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    sizes = [len(p["y"]) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_unsplittable_batches_and_configs_are_refused():
    with pytest.raises(ConfigError, match="same first dimension"):
        share({"x": torch.zeros(4, 2), "edge_index": torch.zeros(2, 7)}, 0, 2)
    d = Dist(rank=0, world_size=4)
    with pytest.raises(ConfigError, match="batch_size .* multiple of the 4 processes; got 6"):
        d.check(ragged_cfg(batch_size=6))
    with pytest.raises(ConfigError, match="must be 'cuda'.*got 'cuda:1'"):
        d.check(ragged_cfg(device="cuda:1"))
    assert d.check(ragged_cfg(batch_size=8)) == torch.device("cpu")


def test_environment_of_the_launcher():
    assert env({}) is None
    e = env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29500"})
    assert (e.rank, e.world_size, e.local_rank, e.master_port) == (1, 2, 1, 29500)
    with pytest.raises(DistributedError, match=r"RANK must be an integer in \[0, 1\] \(set by torchrun\); got .2."):
        env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="WORLD_SIZE must be an integer >= 1 .*; got .x."):
        env({"RANK": "0", "WORLD_SIZE": "x"})
    with pytest.raises(ConfigError, match="--nproc must be an int >= 1; got 0"):
        launch(0, "true")


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_weighted_rank_losses_give_the_global_gradient(world):
    """What the ranks back-propagate, averaged as DDP does, is the gradient of the global
    batch's token mean; the plain mean of the ranks' means is not (so weighting matters).
    The model is float64 but the task's logits are float32 (Task.loss casts them): the
    weighted error is float32 rounding, the unweighted one a different gradient."""
    task = get_task("_test_ragged_copy")(ragged_cfg())
    task.setup()
    torch.manual_seed(0)
    model = task.build_model().double()
    objective = Objective(model, Regime(task.config, task))
    batch = task.train_batches(0)[0]
    objective(batch)[2].backward()
    want = _grads(model)
    parts = [share(batch, r, world) for r in range(world)]
    counts = [loss_count(task, p) for p in parts]
    assert len(set(counts)) > 1  # the ranks do hold different numbers of tokens
    errors = {}
    for weighted in (True, False):
        model.zero_grad()
        for part, n in zip(parts, counts, strict=True):
            w = world * n / sum(counts) if weighted else 1.0
            (objective(part)[2] * w / world).backward()  # / world: DDP's average
        errors[weighted] = (_grads(model) - want).abs().max() / want.abs().max()
    assert errors[True] < 1e-6
    assert errors[False] > 1e-3


# ---- real jobs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """2 processes under torchrun: an uninterrupted run without dropout, and one with
    dropout three ways (whole; stopped half-way; resumed), every write under ``runs``
    audited per rank."""
    root = tmp_path_factory.mktemp("ddp")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2", __file__, "worker", str(root)]
    code, out, _ = run_job(argv)
    assert code == 0, out
    return root


def test_two_processes_train_as_one_at_the_same_global_batch(job, tmp_path):
    one = train(ragged_cfg(), tmp_path / "one", progress=False)
    a, b = weights(job / "runs" / "plain"), weights(tmp_path / "one")
    assert_same_model(a, b, ragged_cfg())
    # the logged loss is the global batch's mean, the evaluations rank 0's
    r2, r1 = rows(job / "runs" / "plain"), rows(tmp_path / "one")
    assert [r["step"] for r in r2] == [r["step"] for r in r1] == [4, 8]
    for x, y in zip(r2, r1, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_accuracy"] == y["val_accuracy"]
    summary = json.loads((job / "runs" / "plain" / "summary.json").read_text())
    assert summary["test"] == pytest.approx(one.test)
    assert load_checkpoint(job / "runs" / "plain" / "checkpoint.pt")["world_size"] == 2


def test_a_resumed_job_ends_with_the_weights_of_an_uninterrupted_one(job):
    whole, part = job / "runs" / "whole", job / "runs" / "part"
    a, b = weights(whole), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = ("time_s", "throughput")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows(whole)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows(part)]
    # not vacuous: the job did stop half-way, and the ranks draw distinct dropout masks
    stopped = json.loads((job / "part-stopped.json").read_text())
    assert stopped == {"status": "interrupted", "step": 5}
    rng = load_checkpoint(part / "checkpoint.pt")["rng_ranks"]
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_a_job_checkpoint_resumes_in_one_process(job, tmp_path):
    """The checkpoint holds the unwrapped model: one process continues a 2-process run
    (with new dropout masks, and it says so)."""
    shutil.copytree(job / "part-at-5", tmp_path / "part")
    cfg = ragged_cfg(model_kwargs={**MODEL, "dropout": 0.1})
    with pytest.warns(UserWarning, match="resuming on 1 process.* checkpointed on 2"):
        r = train(cfg, tmp_path / "part", progress=False, resume=True)
    assert (r.status, r.step) == ("done", 8)
    assert [x["step"] for x in rows(tmp_path / "part")] == [4, 8]


def test_only_rank_0_writes(job):
    audit = [json.loads((job / f"writes-rank{r}.json").read_text()) for r in (0, 1)]
    assert audit[1] == []
    # rank 0's writes are seen (the audit works): every file of a run, in each run
    for run in ("plain", "whole", "part"):
        names = {Path(p).name for _, p in audit[0] if Path(p).parent.name == run}
        assert {"config.json", "data.json", "checkpoint.pt", "best.pt", "metrics.jsonl",
                "summary.json"} <= names, run


def test_a_rank_that_raises_fails_the_job_quickly_with_its_error(tmp_path):
    code, out, seconds = run_job([sys.executable, __file__, "launch-failing", str(tmp_path)],
                                 timeout=90)
    assert code != 0
    assert "boom on rank 1" in out  # the rank's own error
    assert "distributed training failed: " in out and "rank 1 exited with code 1" in out
    assert seconds < 60


def test_attnlab_train_nproc_end_to_end(tmp_path):
    opts = {"n_train": 48, "n_validation": 16, "n_test": 16, "length": 4}
    argv = [sys.executable, "-m", "attnlab", "train", "--task", "copy",
            "--run-dir", str(tmp_path / "cli"), "--max-steps", "4", "--batch-size", "8",
            "--set", "eval_every=2", "--set", "warmup_steps=1", "--no-progress",
            *[a for k, v in opts.items() for a in ("--task-opt", f"{k}={v}")],
            *[a for k, v in MODEL.items() for a in ("--model-opt", f"{k}={v}")]]
    code, out, _ = run_job([*argv, "--nproc", "2"])
    assert code == 0, out
    assert (tmp_path / "cli" / "summary.json").is_file()
    assert out.count("test accuracy") == 2  # rank 0's summary line and table, nothing twice
    cfg = get_task("copy").make_config(max_steps=4, batch_size=8, eval_every=2, warmup_steps=1,
                                       task_kwargs=opts, model_kwargs=dict(MODEL))
    train(cfg, tmp_path / "one", progress=False)
    assert_same_model(weights(tmp_path / "cli" / "seed-0"), weights(tmp_path / "one"), cfg)
    code, out, _ = run_job([*argv, "--nproc", "3"])  # batch 8 for 3 processes
    assert code == 2 and "multiple of the 3 processes; got 8" in out.replace("\n", " ")


# ---- the job's side: python -m torch.distributed.run ... this file worker ROOT -------------
def _audit(runs: Path) -> list:
    """Every file this process opens for writing, renames (its new name), creates or
    removes under ``runs`` (Python's audit events; torch.save's own writer is not one, but
    the atomic rename of what it wrote is)."""
    seen: list = []
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, Path)):
            mode, flags = args[1], args[2]
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+"))
                    or (mode is None and isinstance(flags, int) and flags & writes)):
                return
        elif event not in ("os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir"):
            return
        path = str(args[1] if event in ("os.rename", "os.replace") else args[0])
        if path.startswith(str(runs)):
            seen.append([event, path])

    sys.addaudithook(hook)
    return seen


def _worker(root: Path) -> None:
    rank = int(os.environ["RANK"])
    seen = _audit(root / "runs")
    runs = root / "runs"
    train(ragged_cfg(), runs / "plain", progress=False)
    dropout = ragged_cfg(model_kwargs={**MODEL, "dropout": 0.1})
    train(dropout, runs / "whole", progress=False)
    r = train(dropout, runs / "part", progress=False, stop_after=5)
    if rank == 0:  # outside runs/: the test's own files, not the run's
        (root / "part-stopped.json").write_text(json.dumps({"status": r.status,
                                                            "step": r.step}))
        shutil.copytree(runs / "part", root / "part-at-5")
    train(dropout, runs / "part", progress=False, resume=True)
    (root / f"writes-rank{rank}.json").write_text(json.dumps(seen))


def _failing(run_dir: Path) -> None:
    train(ragged_cfg(task="_test_failing_copy", max_steps=20), run_dir, progress=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, where = sys.argv[1], Path(sys.argv[2])
    if mode == "worker":
        _worker(where)
    elif mode == "failing":
        _failing(where)
    elif mode == "launch-failing":  # through attnlab's launcher, as attnlab train --nproc
        sys.exit(launch(2, sys.executable, ("-u", __file__, "failing", str(where / "run"))))
