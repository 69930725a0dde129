"""Training logs its evaluations to TensorBoard where the ``viz`` extra's ``tensorboard``
is installed; without it, training runs all the same and says once that it writes none."""

from __future__ import annotations

import json
import math
import sys
import warnings

import pytest

import attnlab.train.loop as loop
from attnlab.tasks import get_task
from attnlab.train.loop import NoTensorBoardWarning, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg():
    return get_task("copy").make_config(
        max_steps=4, batch_size=16, eval_every=2, checkpoint_every=5, warmup_steps=1,
        task_kwargs={"n_train": 64, "n_validation": 32, "n_test": 32, "length": 4},
        model_kwargs={"d_model": 16, "num_layers": 1, "num_heads": 2})


def test_training_writes_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (the viz extra) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(_cfg(), run, progress=False)
    [events] = (run / "tb").glob("events.out.tfevents.*")
    assert events.stat().st_size > 0
    # Read back with TensorBoard's own reader; compare with the run's metrics.jsonl.
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "val_accuracy", "lr", "throughput"} <= tags
    for tag in ("train_loss", "val_accuracy", "lr"):
        logged = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in logged] == [2, 4]
        for (_, value), row in zip(logged, rows, strict=True):
            assert math.isclose(value, row[tag], rel_tol=1e-6)  # float32 in the event file


def test_without_tensorboard_training_runs_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import fails
    monkeypatch.setattr(loop, "_TB_SAID", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every warning, not the first per place
        first = train(_cfg(), tmp_path / "a", progress=False)
        second = train(_cfg(), tmp_path / "b", progress=False)
    assert first.status == second.status == "done"
    said = [w for w in caught if issubclass(w.category, NoTensorBoardWarning)]
    assert len(said) == 1
    text = str(said[0].message)
    assert "no TensorBoard event files" in text and '".[viz]"' in text
    assert not (tmp_path / "a" / "tb").exists() and not (tmp_path / "b" / "tb").exists()
