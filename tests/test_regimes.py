"""Training regimes and pre-trained starts: the registry, the standard regime (the task's
own loss, unchanged), ``init_from`` loading a finished run's weights where names and
shapes agree, and every bad value refused by name."""

from __future__ import annotations

import pytest
import torch

from attnlab.tasks import get_task
from attnlab.train.checkpoint import load_checkpoint
from attnlab.train.config import ConfigError
from attnlab.train.loop import train
from attnlab.train.regimes import Regime, get_regime, init_weights, list_regimes

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"n_train": 128, "n_validation": 32, "n_test": 32, "length": 6}
MODEL = {"d_model": 16, "num_layers": 1, "num_heads": 2}


def cfg(**kw):
    base = dict(max_steps=4, batch_size=32, eval_every=4, checkpoint_every=4, warmup_steps=1,
                task_kwargs=dict(TINY), model_kwargs=dict(MODEL))
    return get_task("copy").make_config(**{**base, **kw})


def test_the_standard_regime_is_registered_and_is_the_task_loss():
    assert "standard" in list_regimes() and get_regime("standard") is Regime
    c = cfg()
    task = get_task("copy")(c)
    task.setup()
    torch.manual_seed(0)
    model = task.build_model().eval()  # no dropout: two calls see the same model
    batch = task.train_batches(0)[0]
    regime = Regime(c, task)
    a, na = regime.loss(model, batch)
    b, nb = task.loss(model, batch)
    assert torch.equal(a, b) and na == nb


def test_unknown_regime_and_option_are_named():
    with pytest.raises(ConfigError, match=r"unknown regime 'standrd'.*standard"):
        get_regime("standrd")
    task = get_task("copy")(cfg())
    with pytest.raises(ConfigError, match=r"regime 'standard': unknown option.*'eps'"):
        Regime(cfg(regime_kwargs={"eps": 1.0}), task)
    with pytest.raises(ConfigError, match="TrainConfig.init_from must be None or the path"):
        cfg(init_from="")
    with pytest.raises(ConfigError, match="TrainConfig.regime_kwargs must be a dict"):
        cfg(regime_kwargs=[1])


def test_init_from_starts_from_the_finished_runs_best_weights(tmp_path):
    train(cfg(), tmp_path / "pre", progress=False)
    best = load_checkpoint(tmp_path / "pre" / "best.pt")["model"]
    task = get_task("copy")(cfg())
    task.setup()
    torch.manual_seed(1)
    model = task.build_model()
    info = init_weights(model, tmp_path / "pre")
    assert info["loaded"] == len(best) and not info["kept_initialisation"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k]), k
    # a run started from it records where it came from and steps away from it
    out = train(cfg(init_from=str(tmp_path / "pre"), max_steps=1, eval_every=1),
                tmp_path / "fine", progress=False)
    assert out.summary["init_from"] == str(tmp_path / "pre")
    assert (tmp_path / "fine" / "init_from.json").is_file()


def test_init_from_loads_only_what_matches_and_refuses_what_cannot_start(tmp_path):
    train(cfg(), tmp_path / "pre", progress=False)
    wider = get_task("copy")(cfg(model_kwargs={**MODEL, "d_model": 32}))
    wider.setup()
    with pytest.raises(ConfigError, match="no weight of .* matches this model"):
        init_weights(wider.build_model(), tmp_path / "pre")
    deeper = get_task("copy")(cfg(model_kwargs={**MODEL, "num_layers": 2}))
    deeper.setup()
    info = init_weights(deeper.build_model(), tmp_path / "pre" / "best.pt")
    assert info["loaded"] > 0 and any(".1." in k for k in info["kept_initialisation"])
    with pytest.raises(ConfigError, match="does not exist"):
        init_weights(deeper.build_model(), tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="holds no best.pt"):
        init_weights(deeper.build_model(), tmp_path)
