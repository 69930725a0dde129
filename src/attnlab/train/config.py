"""What a training run is: one validated, JSON-serialisable configuration.

A run directory stores this configuration as ``config.json``; ``--resume`` reads it back
and refuses to continue a run with a different one (a resumed run must be the same run).
Task-specific options (data directory, tokenizer, truncation length, ...) live in
``task_kwargs`` and are validated by the task; model shape in ``model_kwargs`` by the model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.files import read_json
from attnlab.util.checks import did_you_mean

__all__ = ["TrainConfig", "ConfigError", "check_names", "read_run_config"]


class ConfigError(ValueError):
    """A training configuration that cannot run: names the field, expected and given."""


def check_names(given, known, *, what: str) -> None:
    """Refuse names of ``given`` that are not in ``known``, each with its closest match:
    ``ConfigError("<what> 'lenght' (did you mean 'length'?); known: ...")``."""
    known = list(known)
    unknown = [k for k in given if k not in known]
    if not unknown:
        return
    hints = []
    for k in unknown:
        hints.append(f"{k!r}{did_you_mean(k, known, n=1, cutoff=0.6, style='paren')}")
    raise ConfigError(f"{what} {', '.join(hints)}; known: {', '.join(known) or '(none)'}")


@dataclass
class TrainConfig:
    """Every knob of one training run (one seed).

    Optimisation follows the usual recipe for small transformers: AdamW (Loshchilov &
    Hutter 2019), linear warm-up then cosine decay to ``min_lr_ratio * lr``, global-norm
    gradient clipping, evaluation every ``eval_every`` steps with early stopping after
    ``patience`` evaluations without improvement of the task's primary metric.
    """

    task: str
    mechanism: str = "sdpa"
    mechanism_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str = "transformer"          # or a task's baseline, e.g. "lstm", "unet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    regime: str = "standard"            # how it is trained: attnlab.train.regimes
    regime_kwargs: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None        # a finished run (or .pt) whose weights start this one
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    amp: bool = False                  # autocast: bfloat16 on CPU, float16 on CUDA
    eval_every: int = 200
    patience: int | None = None         # evaluations without improvement; None: never stop
    checkpoint_every: int = 200
    time_budget_s: float | None = None  # stop (and evaluate) once training time exceeds it
    target_fraction: float = 0.95       # convergence: first point reaching this of the best
    eval_batches: int | None = None     # cap on validation batches per evaluation (None: all)
    device: str = "cpu"
    threads: int | None = None
    # --context-parallel: each sequence sharded over the processes, ring attention between
    # them (attnlab.train.context); False in configs saved before it existed
    context_parallel: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------
    def _need(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ConfigError(f"TrainConfig.{name} must be {expected}; "
                              f"got {getattr(self, name)!r}")

    def validate(self) -> None:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        self._need("task", isinstance(self.task, str) and bool(self.task), "a task name")
        self._need("mechanism", isinstance(self.mechanism, str) and bool(self.mechanism),
                   "a mechanism name")
        self._need("regime", isinstance(self.regime, str) and bool(self.regime),
                   "a regime name")
        self._need("init_from", self.init_from is None
                   or (isinstance(self.init_from, str) and bool(self.init_from)),
                   "None or the path of a run directory or checkpoint")
        for name in ("mechanism_kwargs", "model_kwargs", "task_kwargs", "regime_kwargs"):
            self._need(name, isinstance(getattr(self, name), dict), "a dict")
        self._need("seed", is_int(self.seed) and self.seed >= 0, "an int >= 0")
        for name in ("max_steps", "batch_size", "eval_every", "checkpoint_every"):
            self._need(name, is_int(getattr(self, name)) and getattr(self, name) >= 1,
                       "an int >= 1")
        self._need("warmup_steps", is_int(self.warmup_steps) and self.warmup_steps >= 0,
                   "an int >= 0")
        self._need("lr", is_num(self.lr) and self.lr > 0, "a float > 0")
        self._need("weight_decay", is_num(self.weight_decay) and self.weight_decay >= 0,
                   "a float >= 0")
        self._need("min_lr_ratio", is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
                   "a float in [0, 1]")
        self._need("grad_clip", self.grad_clip is None
                   or (is_num(self.grad_clip) and self.grad_clip > 0), "None or a float > 0")
        self._need("amp", isinstance(self.amp, bool), "a bool")
        self._need("patience", self.patience is None
                   or (is_int(self.patience) and self.patience >= 1), "None or an int >= 1")
        self._need("time_budget_s", self.time_budget_s is None
                   or (is_num(self.time_budget_s) and self.time_budget_s > 0),
                   "None or a number of seconds > 0")
        self._need("target_fraction", is_num(self.target_fraction)
                   and 0 < self.target_fraction <= 1, "a float in (0, 1]")
        self._need("eval_batches", self.eval_batches is None
                   or (is_int(self.eval_batches) and self.eval_batches >= 1),
                   "None or an int >= 1")
        self._need("device", isinstance(self.device, str), "a device string like 'cpu'")
        self._need("threads", self.threads is None
                   or (is_int(self.threads) and self.threads >= 1), "None or an int >= 1")
        self._need("context_parallel", isinstance(self.context_parallel, bool), "a bool")

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a training configuration must be a mapping; "
                              f"got {type(data).__name__}")
        check_names(data, [f.name for f in dataclasses.fields(cls)],
                    what="unknown training option(s)")
        if "task" not in data:
            raise ConfigError("a training configuration needs 'task'")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The configuration in ``run_dir/config.json``; every problem with it (unreadable,
    malformed JSON, unknown or invalid fields) names the file."""
    path = Path(run_dir) / "config.json"
    data = read_json(path, "run config")
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"run config {path}: {e}") from None
