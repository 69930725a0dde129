"""Training: one loop for every task, resumable runs, metrics.

>>> from attnlab.train import TrainConfig, train
>>> result = train(TrainConfig(task="copy", max_steps=200), "runs/copy")  # doctest: +SKIP

``train`` and friends are imported on first use: ``attnlab.tasks`` imports this package's
``config`` module, and the loop imports the tasks.
"""

from attnlab.train.config import ConfigError, TrainConfig

__all__ = ["TrainConfig", "ConfigError", "train", "load_trained", "RunResult"]


def __getattr__(name: str):
    if name in ("train", "load_trained", "RunResult"):
        from attnlab.train import loop
        return getattr(loop, name)
    raise AttributeError(f"module 'attnlab.train' has no attribute {name!r}")
