"""Adversarial training on the embeddings (regime ``adversarial``): FGM is eps along the
loss gradient (checked against the gradient taken by hand), PGD stays in the eps-ball and
reaches its boundary, nothing lands on padding, the attack raises the loss, the parameter
gradient is exactly that of clean + adv_weight * adv at the final r, training with each
attack runs, resumes and reports the attacked metrics (eval_eps=0: exactly the clean
ones), and bad options are named."""

from __future__ import annotations

import math

import pytest
import torch
from corpora import write_emotions
from torch import nn

import attnlab.train.adversarial  # noqa: F401  (registers the regime)
from attnlab.cli.main import main
from attnlab.tasks import get_task
from attnlab.train.adversarial import (
    Adversarial,
    EmbeddingPerturbation,
    attention_entropy,
    pgd_perturbation,
)
from attnlab.train.checkpoint import load_checkpoint
from attnlab.train.config import ConfigError
from attnlab.train.loop import train
from attnlab.train.regimes import get_regime, list_regimes

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = {"d_model": 16, "num_heads": 2, "num_layers": 1, "dropout": 0.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_emotions(tmp_path_factory.mktemp("emotions"))


def cfg(data, **kw):
    regime_kwargs = kw.pop("regime_kwargs", {})
    if kw.get("regime", "adversarial") == "adversarial":  # a cheap evaluation attack
        regime_kwargs = {"eval_steps": 2, **regime_kwargs}
    base = dict(max_steps=4, eval_every=2, checkpoint_every=2, warmup_steps=1, batch_size=16,
                lr=3e-3, model_kwargs=dict(MODEL), regime="adversarial",
                regime_kwargs=regime_kwargs,
                task_kwargs={"data_dir": str(data), "download": False, "source": "dair-ai",
                             "max_len": 16})
    return get_task("emotions").make_config(**{**base, **kw})


def built(data, tmp_path, **kw):
    """The task, a fresh model (seeded, train mode, no dropout) and a padded batch."""
    c = cfg(data, **kw)
    task = get_task("emotions")(c, tmp_path)
    task.setup()
    torch.manual_seed(0)
    model = task.build_model()
    batch = task._batch("train", [0, 1, 2, 3, 6, 9, 12, 40])
    assert batch["padding_mask"].any() and not batch["padding_mask"].all(1).any()
    return c, task, model, batch


def loss_at(task, model, batch, r=None):
    """The task's loss with ``r`` added to the embeddings by a hook written here."""
    if r is None:
        return task.loss(model, batch)[0]
    h = model.embed.register_forward_hook(lambda m, i, e: e + r)
    try:
        return task.loss(model, batch)[0]
    finally:
        h.remove()


def norms(r):
    return r.flatten(1).norm(dim=1)


def test_fgm_is_eps_along_the_loss_gradient_and_zero_at_padding(data, tmp_path):
    _, task, model, batch = built(data, tmp_path)
    seen = []
    h = model.embed.register_forward_hook(lambda m, i, e: seen.append(e) or e)
    loss = task.loss(model, batch)[0]
    h.remove()
    g = torch.autograd.grad(loss, seen[0])[0] * (~batch["padding_mask"])[..., None]
    eps = 0.05
    want = eps * g / norms(g)[:, None, None]
    with EmbeddingPerturbation(model, ~batch["padding_mask"]) as p:
        r, clean = pgd_perturbation(lambda: task.loss(model, batch)[0], p, eps=eps, steps=1,
                                    alpha=eps)
    torch.testing.assert_close(r, want, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(norms(r), torch.full((len(r),), eps), rtol=1e-5, atol=0)
    assert torch.equal(r[batch["padding_mask"]], torch.zeros_like(r[batch["padding_mask"]]))
    assert clean.item() == pytest.approx(loss.item(), abs=1e-6)
    # first order: L(e + eps g/|g|) = L(e) + eps |g| + O(eps^2) > L(e) for a small eps
    assert loss_at(task, model, batch, r).item() > loss.item()
    assert all(x.grad is None for x in model.parameters())  # the attack touched no .grad


def test_pgd_stays_in_the_ball_and_reaches_its_boundary(data, tmp_path):
    _, task, model, batch = built(data, tmp_path)
    pad = batch["padding_mask"]

    def attack(**kw):
        with EmbeddingPerturbation(model, ~pad) as p:
            return pgd_perturbation(lambda: task.loss(model, batch)[0], p, **kw)[0]

    eps = 0.5
    inside = attack(eps=eps, steps=4, alpha=eps / 10)  # 4 steps of eps/10 cannot leave it
    assert (norms(inside) <= 0.4 * eps * (1 + 1e-5)).all()
    edge = attack(eps=eps, steps=4, alpha=2 * eps)     # every step lands outside: projected
    torch.testing.assert_close(norms(edge), torch.full((len(edge),), eps), rtol=1e-5, atol=0)
    for r in (inside, edge):
        assert torch.equal(r[pad], torch.zeros_like(r[pad]))
    clean = task.loss(model, batch)[0].item()
    assert loss_at(task, model, batch, attack(eps=0.05, steps=3, alpha=0.02)).item() > clean
    # one step of the full radius is FGM; radius 0 is no perturbation at all
    torch.testing.assert_close(attack(eps=eps, steps=1, alpha=eps),
                               attack(eps=eps, steps=1, alpha=5 * eps), rtol=1e-5, atol=1e-7)
    assert not attack(eps=0.0, steps=3, alpha=0.0).any()


def test_each_sequence_gets_its_own_ball(data, tmp_path):
    """The batch's mean loss gives each sequence its own gradient: attacked alone (no
    padding), a sequence gets the perturbation of its real tokens in the batch."""
    _, task, model, batch = built(data, tmp_path)
    with EmbeddingPerturbation(model, ~batch["padding_mask"]) as p:
        r = pgd_perturbation(lambda: task.loss(model, batch)[0], p, eps=0.3, steps=3,
                             alpha=0.2)[0]
    i = int(batch["padding_mask"].sum(1).argmax())  # the most padded one
    n = int((~batch["padding_mask"][i]).sum())
    one = {"ids": batch["ids"][i:i + 1, :n], "padding_mask": batch["padding_mask"][i:i + 1, :n],
           "labels": batch["labels"][i:i + 1]}
    with EmbeddingPerturbation(model, ~one["padding_mask"]) as p:
        alone = pgd_perturbation(lambda: task.loss(model, one)[0], p, eps=0.3, steps=3,
                                 alpha=0.2)[0]
    torch.testing.assert_close(alone[0], r[i, :n], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("attack", ["fgm", "pgd"])
def test_parameter_gradient_is_clean_plus_weighted_adversarial_at_the_final_r(
        data, tmp_path, attack):
    c, task, model, batch = built(data, tmp_path, regime_kwargs={
        "train_attack": attack, "eps": 0.5, "pgd_steps": 3, "adv_weight": 0.7})
    regime = get_regime("adversarial")(c, task)
    regime.setup(model, torch.device("cpu"))
    loss, units = regime.loss(model, batch)
    assert units == int((~batch["padding_mask"]).sum())
    assert all(x.grad is None for x in model.parameters())  # nothing before the backward
    loss.backward()
    got = {n: x.grad.clone() for n, x in model.named_parameters()}
    r = regime.last_r
    assert r is not None and (norms(r) <= 0.5 * (1 + 1e-5)).all()
    model.zero_grad(set_to_none=True)
    by_hand = loss_at(task, model, batch) + 0.7 * loss_at(task, model, batch, r)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    by_hand.backward()
    for n, x in model.named_parameters():
        torch.testing.assert_close(got[n], x.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_train_attack_none_is_the_standard_regime(data, tmp_path):
    train(cfg(data, regime_kwargs={"train_attack": "none"}), tmp_path / "none", progress=False)
    train(cfg(data, regime="standard", regime_kwargs={}), tmp_path / "std", progress=False)
    a = load_checkpoint(tmp_path / "none" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "std" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("attack", ["none", "fgm", "pgd"])
def test_each_attack_trains_and_reports_attacked_metrics(data, tmp_path, attack):
    out = train(cfg(data, regime_kwargs={"train_attack": attack}), tmp_path / attack,
                progress=False)
    assert out.status == "done" and out.summary["regime"] == "adversarial"
    for split in (out.test, out.summary["best_validation"]):
        assert 0.0 <= split["attacked_accuracy"] <= 1.0
        for k in ("attention_entropy", "attacked_attention_entropy"):
            assert 0.0 <= split[k] <= math.log(16)
    assert "val_attacked_accuracy" in out.best


def test_eval_eps_zero_is_exactly_the_clean_model(data, tmp_path):
    c, task, model, _ = built(data, tmp_path, regime_kwargs={"eval_eps": 0.0})
    regime = Adversarial(c, task)
    regime.setup(model, torch.device("cpu"))
    got = regime.evaluate(model, "validation")
    assert got["attacked_accuracy"] == task.evaluate(model, "validation")["accuracy"]
    assert got["attacked_attention_entropy"] == got["attention_entropy"]
    # the entropy, by hand: -sum p log p over keys, averaged over layers, heads, real rows
    total, count = 0.0, 0
    for b in task.eval_batches("validation"):
        for m in model.attention_maps(b["ids"], b["padding_mask"]):
            for i in range(len(b["ids"])):
                n = int((~b["padding_mask"][i]).sum())
                p = m[i, :, :n, :n].double()  # padded keys weigh 0
                total += float(-(p * p.clamp_min(1e-300).log()).sum())
                count += m.shape[1] * n
    assert got["attention_entropy"] == pytest.approx(total / count, rel=1e-9)
    assert not any(x.grad is not None and x.grad.any() for x in model.parameters())
    assert model.training  # the mode is restored


def test_attention_entropy_of_uniform_and_one_hot_weights():
    real = torch.tensor([[True, True, True, False]])
    uniform = torch.zeros(1, 2, 4, 4)
    uniform[..., :3] = 1 / 3
    one_hot = torch.eye(4).expand(1, 2, 4, 4)
    total, count = attention_entropy([uniform, one_hot], real)
    assert count == 2 * 2 * 3 and total / count == pytest.approx(math.log(3) / 2)
    assert attention_entropy([torch.zeros(2, 3)], None) is None


def test_a_resumed_run_ends_as_an_uninterrupted_one(data, tmp_path):
    c = cfg(data, regime_kwargs={"train_attack": "pgd"}, model_kwargs={**MODEL, "dropout": 0.2})
    train(c, tmp_path / "whole", progress=False)
    assert train(c, tmp_path / "cut", progress=False, stop_after=3).status == "interrupted"
    train(c, tmp_path / "cut", progress=False, resume=True)
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("opts, match", [
    ({"train_attack": "pdg"}, r"train_attack must be one of .*got 'pdg'.*'pgd'"),
    ({"eval_attack": "fgm"}, r"eval_attack must be one of 'pgd', 'none'; got 'fgm'"),
    ({"eps": -1.0}, r"eps must be a finite number in \[0.0, inf\); got -1.0"),
    ({"eps": "big"}, r"eps must be a float; got str"),
    ({"pgd_steps": 0}, r"pgd_steps must be >= 1; got 0"),
    ({"pgd_alpha": 0.0}, r"pgd_alpha must be > 0 or None"),
    ({"adv_weight": float("nan")}, r"adv_weight must be a finite number"),
    ({"eval_steps": 1.5}, r"eval_steps must be an int; got float"),
    ({"epsilon": 1.0}, r"regime 'adversarial': unknown option.*'epsilon' \(did you mean 'eps'"),
])
def test_bad_options_are_named(data, opts, match):
    task = get_task("emotions")(cfg(data))
    with pytest.raises(ConfigError, match=match):
        Adversarial(cfg(data, regime_kwargs=opts), task)


def test_models_and_tasks_it_cannot_attack_are_refused(data, tmp_path):
    regime = Adversarial(cfg(data), get_task("emotions")(cfg(data)))
    with pytest.raises(ConfigError, match=r"output of model.embed; model 'transformer' "
                                          r"\(Linear\) has no embed module"):
        regime.setup(nn.Linear(2, 2), torch.device("cpu"))
    copy = get_task("copy").make_config(
        max_steps=2, eval_every=2, batch_size=16, task_kwargs={"n_train": 64, "length": 4},
        model_kwargs={"d_model": 16, "num_heads": 2, "num_layers": 1}, regime="adversarial",
        regime_kwargs={"train_attack": "fgm"})
    with pytest.raises(ConfigError, match=r"eval_attack='pgd' needs the task's "
                                          r"eval_batches\(\).*'copy'.*eval_attack=none"):
        train(copy, tmp_path / "copy", progress=False)
    # the training attack is generic (any task's loss, any model with an embed)
    copy.regime_kwargs["eval_attack"] = "none"
    assert train(copy, tmp_path / "copy2", progress=False).status == "done"
    # an embed whose rows are not the batch's tokens is named, not silently misapplied
    _, task, model, batch = built(data, tmp_path)
    with EmbeddingPerturbation(model, ~batch["padding_mask"][:, :-1]) as p:
        p.start()
        with pytest.raises(ConfigError, match=r"model.embed gives shape \(8, \d+, 16\), not "
                                              r"\(B, N, d\) for the batch's \(B, N\)"):
            task.loss(model, batch)


def test_cli_trains_with_regime_options(data, tmp_path, capsys):
    assert "adversarial" in list_regimes()
    args = ["train", "--task", "emotions", "--max-steps", "2", "--no-progress",
            "--run-dir", str(tmp_path / "cli"), "--data-dir", str(data),
            "--task-opt", "source=dair-ai", "--task-opt", "max_len=16", "--task-opt",
            "download=false", "--model-opt", "d_model=16", "--model-opt", "num_heads=2",
            "--set", "eval_every=2", "--set", "batch_size=16", "--regime", "adversarial",
            "--regime-opt", "train_attack=fgm", "--regime-opt", "eps=0.5",
            "--regime-opt", "eval_steps=2"]
    assert main(args) == 0
    assert main(args[:-6] + ["--regime-opt", "train_atack=fgm", "--run-dir",
                             str(tmp_path / "bad")]) == 2
    assert "did you mean 'train_attack'" in capsys.readouterr().err
