"""Training: one loop for every task, resumable runs, metrics.

>>> from attnlab.train import TrainConfig, train
>>> result = train(TrainConfig(task="copy", max_steps=200), "runs/copy")  # doctest: +SKIP

A task implements :class:`attnlab.train.task.Task` (the interface and its registry live
here, below the tasks that implement it); ``attnlab.tasks`` registers the built-in ones.
"""

from attnlab.train import adversarial, distill  # noqa: F401  (registers the regimes)
from attnlab.train.config import ConfigError, TrainConfig
from attnlab.train.loop import RunResult, load_trained, train
from attnlab.train.task import Task, get_task, list_tasks, register_task

__all__ = ["TrainConfig", "ConfigError", "train", "load_trained", "RunResult", "Task",
           "get_task", "list_tasks", "register_task"]
