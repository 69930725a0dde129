"""Attention distillation (regime ``distill``, MiniLM): the KL and value relation equal a
float64 computation written here with loops; padding takes no part; a student equal to
its teacher has zero distillation loss, any other a positive one; only the student
learns (the teacher's parameters get no .grad and do not move); the regime trains on a
generated Emotions layout from a tiny teacher, resumes exactly, reports the KLs, and
refuses teachers with other heads / tokenizer / max_len and weightless mechanisms by
name. Also ``steps_to_fraction`` on a metrics history."""

from __future__ import annotations

import json
import math

import pytest
import torch
from corpora import write_emotions

import attnlab.train.distill  # noqa: F401  (registers the regime)
from attnlab.cli.main import main
from attnlab.tasks import get_task
from attnlab.train.checkpoint import load_checkpoint
from attnlab.train.config import ConfigError
from attnlab.train.distill import (
    Distill,
    load_teacher,
    minilm_losses,
    relation_kl,
    value_relation,
)
from attnlab.train.loop import train
from attnlab.train.metrics import steps_to_fraction
from attnlab.train.regimes import get_regime

pytestmark = pytest.mark.usefixtures("one_thread")
TEACHER = {"d_model": 32, "num_heads": 2, "num_layers": 2, "dropout": 0.0}
STUDENT = {"d_model": 16, "num_heads": 2, "num_layers": 1, "dropout": 0.0}


def cfg(data, model_kwargs=STUDENT, task_kwargs=None, **kw):
    base = dict(max_steps=4, eval_every=2, checkpoint_every=2, warmup_steps=1, batch_size=16,
                lr=3e-3, model_kwargs=dict(model_kwargs), eval_batches=2,
                task_kwargs={"data_dir": str(data), "download": False, "source": "dair-ai",
                             "max_len": 16, **(task_kwargs or {})})
    return get_task("emotions").make_config(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_emotions(tmp_path_factory.mktemp("emotions"), (96, 32, 32), class_words=3,
                          noise=[f"w{i}" for i in range(8)])


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A tiny finished teacher run (2 layers, d_model 32, 2 heads)."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    train(cfg(data, TEACHER), run_dir, progress=False)
    return run_dir


def distill_cfg(data, teacher, opts=None, **kw):
    return cfg(data, regime="distill", regime_kwargs={"teacher": str(teacher), **(opts or {})},
               **kw)


def padded_batch(task):
    batch = task._batch("train", [0, 1, 2, 3, 6, 9, 12, 40])
    assert batch["padding_mask"].any() and not batch["padding_mask"].all(1).any()
    return batch


# ---- the two KLs against loops written here ------------------------------------------------
def hand_kl(p_t, p_s, real):
    """Mean over real (b, head, query) rows of sum over real keys of p_t log(p_t / p_s)."""
    total, rows = 0.0, 0
    B, H, N, _ = p_t.shape
    for b in range(B):
        for h in range(H):
            for i in range(N):
                if not real[b, i]:
                    continue
                rows += 1
                for j in range(N):
                    if real[b, j] and p_t[b, h, i, j] > 0:
                        p, q = float(p_t[b, h, i, j]), float(p_s[b, h, i, j])
                        total += p * math.log(p / q)
    return total / rows


def hand_value_relation(v, real):
    B, H, N, d = v.shape
    out = torch.zeros(B, H, N, N, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                keys = [j for j in range(N) if real[b, j]]
                s = [math.exp(float(v[b, h, i] @ v[b, h, j]) / math.sqrt(d)) for j in keys]
                for j, e in zip(keys, s, strict=True):
                    out[b, h, i, j] = e / sum(s)
    return out


def test_kl_and_value_relation_equal_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    real = torch.tensor([[True] * 5, [True, True, True, False, False]])
    scores_t, scores_s = (torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
                          for _ in range(2))
    keys = real[:, None, None, :]
    p_t = scores_t.masked_fill(~keys, -math.inf).softmax(-1)
    p_s = scores_s.masked_fill(~keys, -math.inf).softmax(-1)
    assert relation_kl(p_t, p_s, real).item() == pytest.approx(hand_kl(p_t, p_s, real),
                                                               rel=1e-12)
    assert relation_kl(p_t, p_t, real).item() == 0.0
    ones = torch.ones(2, 5, dtype=torch.bool)
    assert relation_kl(p_t[:1], p_s[:1]).item() == pytest.approx(
        hand_kl(p_t[:1], p_s[:1], ones[:1]), rel=1e-12)
    v = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(value_relation(v, real), hand_value_relation(v, real),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(value_relation(v), hand_value_relation(v, ones),
                               rtol=1e-12, atol=1e-14)


def test_a_student_probability_of_zero_gives_a_large_finite_kl():
    p_t = torch.tensor([[[[0.5, 0.5]]]], dtype=torch.float64)
    p_s = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    kl = relation_kl(p_t, p_s).item()
    assert math.isfinite(kl) and kl > 10


# ---- on models: zero at equality, padding, gradients ---------------------------------------
def test_loss_is_zero_for_the_teacher_itself_and_positive_for_another_student(data, teacher):
    task, t_model = load_teacher(teacher, torch.device("cpu"))
    _, twin = load_teacher(teacher, torch.device("cpu"))
    batch = padded_batch(task)
    ids, pad = batch["ids"], batch["padding_mask"]
    t64, twin64 = t_model.double(), twin.double()
    l_at, l_vr = minilm_losses(t64, twin64, ids, pad)
    assert l_at.dtype == torch.float64 and l_at.item() == 0.0 and l_vr.item() == 0.0
    torch.manual_seed(5)
    other = task.build_model().double().eval()  # same architecture, other weights
    l_at, l_vr = minilm_losses(t64, other, ids, pad)
    assert l_at.item() > 1e-3 and l_vr.item() > 1e-3
    # the same sums as the hand computation, on the models' own relations
    real = ~pad
    a_t, v_t = t64.attention_relations(ids, pad)
    a_s, v_s = other.attention_relations(ids, pad)
    assert l_at.item() == pytest.approx(hand_kl(a_t.detach(), a_s.detach(), real), rel=1e-10)
    assert l_vr.item() == pytest.approx(hand_kl(hand_value_relation(v_t.detach(), real),
                                                hand_value_relation(v_s.detach(), real),
                                                real), rel=1e-10)


def test_padded_positions_change_nothing(data, teacher):
    task, t_model = load_teacher(teacher, torch.device("cpu"))
    torch.manual_seed(3)
    student = task.build_model().double().eval()
    t_model = t_model.double()
    batch = padded_batch(task)
    ids, pad = batch["ids"], batch["padding_mask"]
    other = ids.masked_fill(pad, 7)  # other tokens where the batch is padding
    assert not torch.equal(other, ids)
    a = minilm_losses(t_model, student, ids, pad)
    b = minilm_losses(t_model, student, other, pad)
    for x, y in zip(a, b, strict=True):
        assert x.item() == pytest.approx(y.item(), rel=1e-13, abs=1e-15)


def test_only_the_student_learns(data, teacher):
    c = distill_cfg(data, teacher)
    task = get_task("emotions")(c)
    task.setup()
    torch.manual_seed(1)
    student = task.build_model()
    regime = Distill(c, task)
    regime.setup(student, torch.device("cpu"))
    before = {k: v.clone() for k, v in regime.teacher.state_dict().items()}
    assert not regime.teacher.training
    assert all(not p.requires_grad for p in regime.teacher.parameters())
    batch = padded_batch(task)
    loss, units = regime.loss(student, batch)
    task_loss, task_units = task.loss(student, batch)
    assert units == task_units and loss.item() > task_loss.item()  # the KLs are added
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in regime.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    after = regime.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # weights 0: exactly the task's loss (and no teacher forward is needed)
    zero = Distill(distill_cfg(data, teacher, {"attention_weight": 0.0,
                                                  "value_weight": 0.0}), task)
    zero.setup(student, torch.device("cpu"))
    student.eval()
    assert torch.equal(zero.loss(student, batch)[0], task.loss(student, batch)[0])


# ---- training runs ---------------------------------------------------------------------------
def test_distill_trains_reports_the_kls_and_resumes(data, teacher, tmp_path):
    c = distill_cfg(data, teacher)
    assert get_regime("distill") is Distill
    r = train(c, tmp_path / "whole", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text()
            .splitlines()]
    assert all(row["val_attention_kl"] > 0 and row["val_value_relation_kl"] > 0
               for row in rows)
    assert r.summary["teacher"]["num_heads"] == 2 and "attention_kl" in r.test
    assert train(c, tmp_path / "cut", progress=False, stop_after=3).status == "interrupted"
    train(c, tmp_path / "cut", progress=False, resume=True)
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert not any(k.startswith("teacher") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint file of the teacher run works as well as its directory
    f = distill_cfg(data, teacher / "best.pt", max_steps=1, eval_every=1)
    assert train(f, tmp_path / "file", progress=False).status == "done"


def test_cli_trains_with_a_teacher(data, teacher, tmp_path, capsys):
    args = ["train", "--task", "emotions", "--max-steps", "2", "--no-progress",
            "--run-dir", str(tmp_path / "cli"), "--data-dir", str(data),
            "--task-opt", "source=dair-ai", "--task-opt", "max_len=16", "--task-opt",
            "download=false", "--model-opt", "d_model=16", "--model-opt", "num_heads=2",
            "--model-opt", "num_layers=1", "--set", "eval_every=2", "--set", "batch_size=16",
            "--regime", "distill", "--regime-opt", f"teacher={teacher}",
            "--regime-opt", "value_weight=0.5"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "cli" / "seed-0" / "summary.json").read_text())
    assert summary["options"]["teacher"] == str(teacher)
    assert summary["options"]["value_weight"] == 0.5
    bad = args[:-4] + ["--regime-opt", f"techer={teacher}", "--run-dir", str(tmp_path / "b")]
    assert main(bad) == 2
    assert "did you mean 'teacher'" in capsys.readouterr().err


def test_teachers_it_cannot_learn_from_are_refused(data, teacher, tmp_path):
    def setup(c):
        task = get_task("emotions")(c)
        task.setup()
        Distill(c, task).setup(task.build_model(), torch.device("cpu"))

    with pytest.raises(ConfigError, match=r"teacher's last layer has num_heads=2, the "
                                          r"student's 4"):
        setup(cfg(data, {**STUDENT, "num_heads": 4}, regime="distill",
                  regime_kwargs={"teacher": str(teacher)}))
    with pytest.raises(ConfigError, match=r"teacher's max_len is 16, the student's 12"):
        setup(cfg(data, task_kwargs={"max_len": 12}, regime="distill",
                  regime_kwargs={"teacher": str(teacher)}))
    with pytest.raises(ConfigError, match=r"teacher's tokenizer kind is 'word', the "
                                          r"student's 'char'"):
        setup(cfg(data, task_kwargs={"tokenizer": "char"}, regime="distill",
                  regime_kwargs={"teacher": str(teacher)}))
    with pytest.raises(ConfigError, match=r"another vocabulary map"):
        setup(cfg(data, task_kwargs={"vocab_size": 12}, regime="distill",
                  regime_kwargs={"teacher": str(teacher)}))
    with pytest.raises(ConfigError, match=r"CLS token"):
        setup(cfg(data, task_kwargs={"pooling": "cls"}, regime="distill",
                  regime_kwargs={"teacher": str(teacher)}))
    with pytest.raises(ConfigError, match=r"mechanism 'fnet', which has no attention "
                                          r"weights \(returns_weights=False"):
        setup(cfg(data, mechanism="fnet", regime="distill",
                  regime_kwargs={"teacher": str(teacher)}))
    with pytest.raises(ConfigError, match=r"student model LSTMClassifier has no "
                                          r"attention_relations"):
        setup(cfg(data, {"d_model": 16, "hidden": 16}, model="lstm", regime="distill",
                  regime_kwargs={"teacher": str(teacher)}))
    with pytest.raises(ConfigError, match=r"teacher .*nowhere does not exist"):
        setup(distill_cfg(data, tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"teacher .* is not a finished run"):
        setup(distill_cfg(data, tmp_path))


@pytest.mark.parametrize("opts, match", [
    ({}, r"option teacher is required"),
    ({"teacher": "x", "attention_weight": -1.0}, r"attention_weight must be a finite number"),
    ({"teacher": "x", "value_weight": "big"}, r"value_weight must be a float; got str"),
    ({"teacher": "x", "temprature": 2}, r"regime 'distill': unknown option.*'temprature'"),
])
def test_bad_options_are_named(data, opts, match):
    c = cfg(data, regime="distill", regime_kwargs=opts)
    with pytest.raises(ConfigError, match=match):
        Distill(c, get_task("emotions")(c))


def test_steps_to_fraction_of_the_best():
    rows = [{"step": 10, "val_accuracy": 0.5}, {"step": 20, "val_accuracy": 0.9},
            {"step": 30, "val_accuracy": 0.96}, {"step": 40, "val_accuracy": 1.0},
            {"step": 50}]
    assert steps_to_fraction(rows, "val_accuracy") == 30   # first >= 0.95 * 1.0
    assert steps_to_fraction(rows, "val_accuracy", fraction=0.9) == 20
    assert steps_to_fraction(rows[:2], "val_accuracy") == 20  # its own best, 0.9
    loss = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 2.05}, {"step": 3, "loss": 2.0}]
    assert steps_to_fraction(loss, "loss", mode="min") == 2  # 2.05 * 0.95 <= 2.0
    with pytest.raises(ValueError, match=r"no row of the history has 'val_acc'"):
        steps_to_fraction(rows, "val_acc")
