"""Training regimes: how a task's model is trained, as opposed to what the task is.

The standard regime minimises the task's own loss. Others change the objective around it
for any task and mechanism: adversarial training perturbs the inputs' embeddings
(``attnlab.train.adversarial``), attention distillation adds a teacher's attention to the
loss (``attnlab.train.distill``). ``attnlab train --regime NAME --regime-opt key=value``
picks one; a regime registers itself with :func:`register_regime` where it is defined, as
tasks and mechanisms do, so this module imports none of them.

A regime may also report metrics of its own at every evaluation (e.g. accuracy under an
attack): :meth:`Regime.evaluate` adds them to the task's, prefixed by nothing, so they
appear in ``metrics.jsonl`` and the run's summary like the task's own.

``init_from`` (``attnlab train --init-from RUN_OR_CHECKPOINT``) is the other half of
pre-training: :func:`init_weights` loads a finished run's best weights into a fresh model
wherever names and shapes agree (a pre-trained encoder into a classifier), and says what
it loaded and what it left at its initialisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from attnlab.train.checkpoint import CheckpointError, load_checkpoint
from attnlab.train.config import ConfigError, TrainConfig, check_names
from attnlab.train.task import Batch, Task
from attnlab.util.checks import did_you_mean

__all__ = ["Regime", "get_regime", "init_weights", "list_regimes", "register_regime"]

_REGIMES: dict[str, type[Regime]] = {}


class Regime:
    """The standard regime (the task's loss); subclasses override :meth:`loss`, and
    :meth:`setup` / :meth:`evaluate` where they need to."""

    name: ClassVar[str] = "standard"
    summary: ClassVar[str] = "the task's own loss"
    options: ClassVar[dict[str, Any]] = {}   # regime_kwargs accepted, with their defaults

    def __init__(self, config: TrainConfig, task: Task, run_dir: Path | None = None) -> None:
        self.config, self.task = config, task
        self.run_dir = Path(run_dir) if run_dir is not None else None
        check_names(config.regime_kwargs, self.options,
                    what=f"regime {self.name!r}: unknown option(s)")
        self.opts = {**self.options, **config.regime_kwargs}

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Called once the model is built and on ``device`` (load a teacher, check that the
        model supports the regime)."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """The objective of one step and how many ``task.count_unit`` the batch holds."""
        return self.task.loss(model, batch)

    def evaluate(self, model: nn.Module, split: str, max_batches: int | None = None
                 ) -> dict[str, Any]:
        """Metrics of the regime's own on ``split``, merged into the task's."""
        return {}

    def info(self) -> dict[str, Any]:
        return {"regime": self.name, "options": dict(self.opts)}


def register_regime(cls: type[Regime]) -> type[Regime]:
    """Class decorator: make ``cls`` available as ``attnlab train --regime cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Regime)):
        raise TypeError("register_regime: a Regime subclass expected")
    if cls.name in _REGIMES and _REGIMES[cls.name] is not cls:
        raise ValueError(f"register_regime: regime {cls.name!r} is already registered by "
                         f"{_REGIMES[cls.name].__module__}")
    _REGIMES[cls.name] = cls
    return cls


register_regime(Regime)


def get_regime(name: str) -> type[Regime]:
    if name in _REGIMES:
        return _REGIMES[name]
    raise ConfigError(f"unknown regime {name!r}{did_you_mean(name, _REGIMES, n=3)} "
                      f"(known: {', '.join(sorted(_REGIMES))})")


def list_regimes() -> list[str]:
    return sorted(_REGIMES)


def _weights_file(path: Path) -> Path:
    """A checkpoint file, or the ``best.pt`` of a run directory (one seed's)."""
    if path.is_dir():
        if (path / "best.pt").is_file():
            return path / "best.pt"
        seeds = sorted(p for p in path.glob("seed-*") if (p / "best.pt").is_file())
        hint = f"; pass one seed's directory, e.g. {seeds[0]}" if seeds else ""
        raise ConfigError(f"init_from: {path} holds no best.pt (not a finished run{hint})")
    if not path.is_file():
        raise ConfigError(f"init_from: {path} does not exist (a run directory or a .pt "
                          f"checkpoint expected)")
    return path


def init_weights(model: nn.Module, source: str | Path) -> dict[str, Any]:
    """Load ``source``'s model weights into ``model`` wherever a name and its shape agree;
    a ``ConfigError`` when none does (another architecture: nothing to start from).
    Returns what was loaded and what kept its initialisation (for the run's records)."""
    path = _weights_file(Path(source))
    try:
        weights = load_checkpoint(path)["model"]
    except (CheckpointError, KeyError) as e:
        raise ConfigError(f"init_from: {path} is not a usable attnlab checkpoint ({e})") from None
    own = model.state_dict()
    loaded = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    mismatched = sorted(k for k, v in weights.items() if k in own and own[k].shape != v.shape)
    if not loaded:
        raise ConfigError(f"init_from: no weight of {path} matches this model by name and "
                          f"shape ({len(weights)} in the file, {len(own)} in the model): "
                          f"another architecture or model size?")
    model.load_state_dict(loaded, strict=False)
    return {"init_from": str(path), "loaded": len(loaded),
            "kept_initialisation": sorted(k for k in own if k not in loaded),
            "shape_mismatch": mismatched,
            "unused": sorted(k for k in weights if k not in own)}
