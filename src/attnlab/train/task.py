"""What a task is, and the registry that ``attnlab train --task NAME`` looks names up in.

A task owns its data (loading, splits, tokenizer), builds its model for any mechanism, cuts
deterministic training batches, computes the loss and evaluates. The training loop in
``attnlab.train.loop`` knows nothing else about it, so a new task plugs in by subclassing
:class:`Task` and decorating it with :func:`register_task` where it is defined (as mechanisms
do with ``register_mechanism``).

The interface and the registry live here, below the tasks, as timm's registry lives below
its models: this module imports no task. ``import attnlab`` imports ``attnlab.tasks``,
which registers the built-in ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from attnlab.files import write_json
from attnlab.train.config import ConfigError, TrainConfig, check_names
from attnlab.util.checks import did_you_mean

__all__ = ["Task", "register_task", "get_task", "list_tasks", "Batch", "eval_mode"]

Batch = dict[str, torch.Tensor]
_TASKS: dict[str, type[Task]] = {}


class Task(ABC):
    """One trainable task. Subclasses set the class attributes and implement the methods.

    ``train_batches(epoch)`` must be a pure function of ``(config.seed, epoch)``: the
    training loop resumes an interrupted run by asking for the same epoch again and skipping
    the batches it has already done.
    """

    name: ClassVar[str]
    kind: ClassVar[str]               # classification | language_model | inpainting | seq2seq
    metric: ClassVar[str]             # primary validation metric, e.g. "accuracy"
    mode: ClassVar[str] = "max"       # "max" or "min" (perplexity)
    summary: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}    # task_kwargs accepted, with their defaults
    defaults: ClassVar[dict[str, Any]] = {}   # TrainConfig fields this task sets by default
    models: ClassVar[tuple[str, ...]] = ("transformer",)  # first is the default
    count_unit: ClassVar[str] = "tokens"      # what throughput counts

    def __init__(self, config: TrainConfig, run_dir: Path | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        check_names(config.task_kwargs, self.options,
                    what=f"task {self.name!r}: unknown option(s)")
        if config.model not in self.models:
            raise ConfigError(f"task {self.name!r}: model must be one of {list(self.models)}; "
                              f"got {config.model!r}")
        self.opts = {**self.options, **config.task_kwargs}

    # ---- what every task implements ----------------------------------------------------
    @abstractmethod
    def setup(self) -> None:
        """Load data, build splits and tokenizer; save what the run needs into run_dir."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model for ``config.model`` with ``config.mechanism`` (after seeding)."""

    @abstractmethod
    def train_batches(self, epoch: int) -> Sequence[Batch]:
        """The training batches of ``epoch``, in order; a pure function of (seed, epoch)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean training loss of ``batch`` and how many ``count_unit`` it holds."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, max_batches: int | None = None
                 ) -> dict[str, Any]:
        """Metrics of ``model`` on ``split`` ("validation" or "test"); includes ``metric``."""

    # ---- optional: what generic regimes need (an attack on the eval batches, ...) -------
    def eval_batches(self, split: str, max_batches: int | None = None) -> Sequence[Batch]:
        """The batches :meth:`evaluate` sees on ``split``, in its order (CPU tensors)."""
        raise ConfigError(f"task {self.name!r} does not support eval_batches (a regime "
                          f"that evaluates batch by batch needs it)")

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C), labels (B,))`` of ``batch``, both on the model's device, in
        whatever mode (train/eval, grad or not) the caller set."""
        raise ConfigError(f"task {self.name!r} does not support logits (a regime that "
                          f"attacks or inspects a classifier's outputs needs it)")

    # ---- helpers ------------------------------------------------------------------------
    @classmethod
    def make_config(cls, **overrides: Any) -> TrainConfig:
        """A TrainConfig for this task: its ``defaults`` under the given ``overrides``
        (dict fields such as ``model_kwargs`` are merged key by key)."""
        merged = {**cls.defaults, **overrides, "task": cls.name}
        for key, default in cls.defaults.items():
            if isinstance(default, dict) and isinstance(overrides.get(key), dict):
                merged[key] = {**default, **overrides[key]}
        return TrainConfig.from_dict(merged)

    def info(self) -> dict[str, Any]:
        """What the data looked like (sizes, classes, notes) for the run's records."""
        return {}

    def save_json(self, name: str, data: Any) -> None:
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / name, data, sort_keys=True)

    def better(self, new: float, best: float | None) -> bool:
        if best is None:
            return True
        return new > best if self.mode == "max" else new < best


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``attnlab train --task cls.name``."""
    for attr in ("name", "kind", "metric"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"register_task: {cls.__name__}.{attr} must be a str")
    if cls.mode not in ("max", "min"):
        raise TypeError(f"register_task: {cls.__name__}.mode must be 'max' or 'min'")
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"register_task: task {cls.name!r} is already registered "
                         f"by {_TASKS[cls.name].__module__}")
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    if name in _TASKS:
        return _TASKS[name]
    raise ConfigError(f"unknown task {name!r}{did_you_mean(name, _TASKS, n=3)} "
                      f"(known: {', '.join(sorted(_TASKS))})")


def list_tasks() -> list[str]:
    return sorted(_TASKS)


class eval_mode:
    """``with eval_mode(model):`` no dropout, no autograd; restores the previous mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        return self.model

    def __exit__(self, *exc) -> None:
        torch.set_grad_enabled(self.grad)
        self.model.train(self.was)
