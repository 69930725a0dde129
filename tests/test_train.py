"""The training loop: exact resume, checkpoints, early stopping, budgets, seeds, database."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics

import pytest
import torch

from attnlab.tasks import get_task
from attnlab.tasks.language import Copy
from attnlab.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from attnlab.train.config import ConfigError, TrainConfig
from attnlab.train.loop import train
from attnlab.train.optim import lr_factor
from attnlab.train.runs import train_seeds
from attnlab.train.task import register_task

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"n_train": 320, "n_validation": 64, "n_test": 64, "length": 6}
MODEL = {"d_model": 32, "num_layers": 1, "num_heads": 2, "dropout": 0.1}


def copy_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=24, batch_size=32, eval_every=8, checkpoint_every=5,
                warmup_steps=4, task_kwargs=dict(TINY), model_kwargs=dict(MODEL), lr=3e-3)
    base.update(kw)
    return get_task("copy").make_config(**base)


def weights(run_dir, name="checkpoint.pt"):
    return load_checkpoint(run_dir / name)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("stop_at", [3, 13])  # inside the first epoch; inside the second
def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, stop_at):
    cfg = copy_cfg()
    whole = train(cfg, tmp_path / "whole", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_after=stop_at)
    assert part.status == "interrupted" and part.step == stop_at
    resumed = train(cfg, tmp_path / "part", progress=False, resume=True)
    assert resumed.status == whole.status == "done"
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "part"))
    h1 = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    drop = ("time_s", "throughput")
    assert [{k: v for k, v in r.items() if k not in drop} for r in h1] == \
        [{k: v for k, v in r.items() if k not in drop} for r in h2]
    assert resumed.test == whole.test


def test_resume_without_the_rng_state_would_differ(tmp_path):
    """The equality above is not vacuous: dropout draws from the RNG the checkpoint keeps."""
    cfg = copy_cfg()
    train(cfg, tmp_path / "a", progress=False, stop_after=13)
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    ckpt["rng"]["torch"] = torch.manual_seed(12345).get_state()
    save_checkpoint(tmp_path / "a" / "checkpoint.pt", {k: v for k, v in ckpt.items()
                                                       if k != "format"})
    train(cfg, tmp_path / "a", progress=False, resume=True)
    train(cfg, tmp_path / "b", progress=False)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_and_stops(tmp_path):
    @register_task
    class SelfKill(Copy):
        name = "_test_selfkill"

        def loss(self, model, batch):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 4:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop, not fatal
            return super().loss(model, batch)

    cfg = get_task("_test_selfkill").make_config(**copy_cfg().to_dict() | {"task": None})
    r = train(cfg, tmp_path, progress=False)
    assert r.status == "interrupted" and r.step == 4
    assert load_checkpoint(tmp_path / "checkpoint.pt")["progress"]["step"] == 4
    assert signal.getsignal(signal.SIGTERM) is not None  # handler restored afterwards


def test_run_dir_rules(tmp_path):
    cfg = copy_cfg(max_steps=4, eval_every=4)
    train(cfg, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(cfg, tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"configuration differs.*lr: 0.003 -> 0.001"):
        train(cfg.replace(lr=1e-3), tmp_path, progress=False, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint.pt"):
        train(cfg, tmp_path / "new", progress=False, resume=True)


def test_checkpoints_load_weights_only(tmp_path):
    save_checkpoint(tmp_path / "ok.pt", {"model": {"w": torch.ones(2)}, "step": 3})
    assert load_checkpoint(tmp_path / "ok.pt")["step"] == 3
    torch.save({"format": 1, "evil": statistics.NormalDist()}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(tmp_path / "obj.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save({"format": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path / "new.pt")


def test_early_stopping_and_time_budget(tmp_path):
    @register_task
    class Worsening(Copy):
        name = "_test_worsening"

        def evaluate(self, model, split, max_batches=None):
            self.n = getattr(self, "n", 0) + 1
            return {"accuracy": 1.0 / self.n}  # the first evaluation is the best

    cfg = get_task("_test_worsening").make_config(
        **copy_cfg(max_steps=100, eval_every=2, patience=3).to_dict() | {"task": None})
    r = train(cfg, tmp_path / "es", progress=False)
    assert r.status == "early_stopped" and r.step == 8  # evals at 2 (best), 4, 6, 8
    assert r.summary["best_step"] == 2
    r = train(copy_cfg(max_steps=100, time_budget_s=1e-9), tmp_path / "tb", progress=False)
    assert r.status == "time_budget" and r.step == 1


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(task="copy", max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    values = [lr_factor(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("field, value, msg", [
    ("lr", 0, "lr must be a float > 0"),
    ("max_steps", 0, "max_steps must be an int >= 1"),
    ("patience", 0, "patience must be None or an int >= 1"),
    ("grad_clip", -1.0, "grad_clip must be None or a float > 0"),
    ("amp", "yes", "amp must be a bool"),
])
def test_bad_config_values(field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(task="copy", **{field: value})


def test_unknown_options_get_close_matches():
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        TrainConfig.from_dict({"task": "copy", "max_step": 3})
    with pytest.raises(ConfigError, match="did you mean 'n_train'"):
        get_task("copy")(copy_cfg(task_kwargs={"n_trian": 3}))
    with pytest.raises(ConfigError, match="model must be one of"):
        get_task("copy")(copy_cfg(model="lstm"))


def test_seeds_aggregate_and_database(tmp_path):
    from attnlab.bench.store import Store
    db = tmp_path / "r.db"
    agg = train_seeds(copy_cfg(max_steps=6, eval_every=3), [0, 1], tmp_path / "run", db=db,
                      progress=False)
    per = [json.loads((tmp_path / "run" / f"seed-{s}" / "summary.json").read_text())
           for s in (0, 1)]
    acc = [p["test"]["accuracy"] for p in per]
    assert agg["test"]["accuracy"]["mean"] == pytest.approx(statistics.mean(acc))
    assert agg["test"]["accuracy"]["std"] == pytest.approx(statistics.stdev(acc))
    assert agg["seeds"] == [0, 1]
    with Store(db) as s:
        rows = s.trainings("copy")
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["test_value"] == pytest.approx(acc[0])
    # resuming a finished multi-seed run keeps it and trains nothing
    again = train_seeds(copy_cfg(max_steps=6, eval_every=3), [0, 1], tmp_path / "run",
                        resume=True, progress=False)
    assert again["test"] == agg["test"]


def _rows(db):
    """The trainings rows of ``db`` by seed, without what differs between two trainings of
    the same configuration: row id, directory, time stamps and timings."""
    from attnlab.bench.store import Store
    timing = ("train_time_s", "throughput")
    with Store(db) as s:
        rows = sorted(s.trainings("copy"), key=lambda r: r["seed"])
    out = []
    for r in rows:
        summary = {k: v for k, v in r["summary"].items() if k not in timing}
        summary["convergence"] = {k: v for k, v in (summary["convergence"] or {}).items()
                                  if k != "time"}
        out.append({**{k: v for k, v in r.items()
                       if k not in ("id", "run_dir", "finished_at", *timing)},
                    "summary": summary})
    return out


def test_a_resumed_run_leaves_the_database_rows_of_one_that_never_stopped(tmp_path,
                                                                          monkeypatch):
    import attnlab.train.runs as runs
    cfg = copy_cfg(max_steps=6, eval_every=3)
    train_seeds(cfg, [0, 1], tmp_path / "whole", db=tmp_path / "whole.db", progress=False)
    real = runs.record

    def killed(*args, **kwargs):  # the process ends after seed 0's summary, before its row
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "record", killed)
    with pytest.raises(KeyboardInterrupt):
        train_seeds(cfg, [0, 1], tmp_path / "part", db=tmp_path / "part.db", progress=False)
    assert (tmp_path / "part" / "seed-0" / "summary.json").exists()
    monkeypatch.setattr(runs, "record", real)
    train_seeds(cfg, [0, 1], tmp_path / "part", db=tmp_path / "part.db", resume=True,
                progress=False)
    whole, part = _rows(tmp_path / "whole.db"), _rows(tmp_path / "part.db")
    assert [r["seed"] for r in part] == [0, 1]
    assert part == whole


def test_resume_with_a_database_records_kept_seeds_once(tmp_path):
    from attnlab.bench.store import Store
    cfg = copy_cfg(max_steps=4, eval_every=2)
    train_seeds(cfg, [0, 1], tmp_path / "run", progress=False)  # trained without --db
    db = tmp_path / "r.db"
    train_seeds(cfg, [0, 1], tmp_path / "run", db=db, resume=True, progress=False)
    with Store(db) as s:
        first = s.trainings("copy")
    assert [r["seed"] for r in first] == [0, 1]
    assert first[0]["summary"] == json.loads(
        (tmp_path / "run" / "seed-0" / "summary.json").read_text())
    train_seeds(cfg, [0, 1], tmp_path / "run", db=db, resume=True, progress=False)
    with Store(db) as s:
        assert s.trainings("copy") == first  # same rows: ids and time stamps kept


def test_loss_falls_on_the_copy_task(tmp_path):
    r = train(copy_cfg(max_steps=60, eval_every=20, lr=5e-3), tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert r.summary["throughput"] > 0 and r.summary["parameters"] > 0


def test_mixed_precision_trains_on_cpu_in_bfloat16(tmp_path):
    r = train(copy_cfg(max_steps=8, eval_every=4, amp=True), tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["train_loss"]) for row in rows)
    assert r.status == "done" and math.isfinite(r.test["accuracy"])


def test_tensorboard_scalars_when_available(tmp_path, monkeypatch):
    import attnlab.train.loop as loop
    written = []

    class Writer:
        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            written.append(("closed", None))

    monkeypatch.setattr(loop, "_tensorboard", lambda run_dir: Writer())
    train(copy_cfg(max_steps=4, eval_every=2), tmp_path, progress=False)
    assert ("val_accuracy", 2) in written and ("train_loss", 4) in written
    assert written[-1] == ("closed", None)
