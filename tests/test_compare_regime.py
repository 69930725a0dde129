"""``attnlab compare --task T --regime R --regime-opt k=v``: the regime reaches every
training run of the plan, and an unknown regime or option is refused before anything
runs (no run directory is written)."""

from __future__ import annotations

import pytest

from attnlab.cli.main import main
from attnlab.compare.plan import Plan, make_plan
from attnlab.train.config import ConfigError
from attnlab.train.regimes import Regime, register_regime


@register_regime
class _Scaled(Regime):
    """A test regime with one option: the task loss times ``factor``."""

    name = "test_scaled_loss"
    options = {"factor": 1.0}

    def loss(self, model, batch):
        loss, n = super().loss(model, batch)
        return loss * self.opts["factor"], n


def _plan(**kw):
    return make_plan(task="copy", mechanisms=["sdpa", "linear"], seeds=[0, 1], max_steps=4,
                     **kw)


def test_the_regime_reaches_every_run_and_survives_json():
    plan = _plan(regime="test_scaled_loss", regime_kwargs={"factor": 2.0})
    for m in plan.trained():
        for seed in plan.seeds:
            cfg = plan.config(m, seed)
            assert (cfg.regime, cfg.regime_kwargs) == ("test_scaled_loss", {"factor": 2.0})
    again = Plan.from_json(plan.to_json())
    assert again.digest() == plan.digest()
    assert again.config("sdpa", 0).regime_kwargs == {"factor": 2.0}


def test_the_standard_regime_leaves_the_plan_as_before():
    assert _plan().digest() == _plan(regime="standard").digest()
    assert "regime" not in _plan(regime="standard").train


def test_unknown_regime_and_option_are_named():
    with pytest.raises(ConfigError, match=r"unknown regime 'test_scaled_los'"):
        _plan(regime="test_scaled_los")
    with pytest.raises(ConfigError, match=r"regime 'test_scaled_loss': unknown option.*"
                                          r"'factr'.*factor"):
        _plan(regime="test_scaled_loss", regime_kwargs={"factr": 2.0})


def test_the_cli_refuses_before_running(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--task", "copy", "--mechanisms", "sdpa", "--max-steps", "2",
               "--out", str(out), "--regime", "test_scaled_loss", "--regime-opt", "factr=2",
               "--no-progress"])
    assert rc == 2 and not out.exists()
    assert "unknown option" in capsys.readouterr().err
    rc = main(["compare", "--regime", "test_scaled_loss", "--out", str(out), "--no-progress"])
    assert rc == 2 and "give --task" in capsys.readouterr().err
