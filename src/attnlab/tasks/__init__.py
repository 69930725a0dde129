"""Tasks to train on: ``attnlab train --task NAME``; ``list_tasks()`` names them all.

Importing this package registers every task (each module decorates its classes with
``register_task``); nothing keeps a second list.
"""

from attnlab.tasks import (  # noqa: F401  (registration)
    graph,
    language,
    mlm,
    pair,
    seq2seq,
    text,
    transformer_xl,
    translation,
    vision,
)
from attnlab.train.task import Task, get_task, list_tasks, register_task

__all__ = ["Task", "get_task", "list_tasks", "register_task"]
