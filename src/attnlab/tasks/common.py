"""Pieces every task shares: deterministic epoch orders, lazy batch lists, model options."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from attnlab.data.tokenize import Tokenizer, load_tokenizer
from attnlab.train.config import check_names
from attnlab.train.metrics import accuracy, confusion_matrix, macro_f1, per_class_f1
from attnlab.train.task import eval_mode

__all__ = ["epoch_order", "LazyBatches", "chunks", "transformer_kwargs", "classification_report",
           "eval_mode", "run_tokenizer"]


def run_tokenizer(run_dir: Path | None, name: str, make: Callable[[], Tokenizer]) -> Tokenizer:
    """The tokenizer saved as ``run_dir / name`` (a resumed or finished run keeps its ids),
    else ``make()``'s, saved there for the next time (not saved without a ``run_dir``)."""
    path = run_dir / name if run_dir is not None else None
    if path is not None and path.exists():
        return load_tokenizer(path)
    tok = make()
    if path is not None:
        tok.save(path)
    return tok


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def chunks(indices: Sequence[int] | torch.Tensor, size: int, *, drop_last: bool = False
           ) -> list[list[int]]:
    idx = [int(i) for i in indices]
    out = [idx[i:i + size] for i in range(0, len(idx), size)]
    if drop_last and out and len(out[-1]) < size:
        out.pop()
    return out


class LazyBatches(Sequence):
    """``n`` batches built by ``make(i)`` only when the loop asks for batch ``i`` (a resumed
    run skips batches without building them)."""

    def __init__(self, n: int, make: Callable[[int], dict]) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(f"batch {i} of {self.n}")
        return self.make(i)


# layer_mechanisms: one mechanism per layer, "local,sdpa" (models.args.check_layer_mechanisms)
_MODEL_KEYS = ("d_model", "num_heads", "num_layers", "d_ff", "dropout", "positions",
               "layer_mechanisms")


def transformer_kwargs(model_kwargs: dict[str, Any], allowed: Sequence[str] = _MODEL_KEYS,
                       *, where: str) -> dict[str, Any]:
    """Check ``model_kwargs`` names before the model sees them (close-match hints)."""
    check_names(model_kwargs, allowed, what=f"{where}: unknown model option(s)")
    return dict(model_kwargs)


def classification_report(preds: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]
                          ) -> dict[str, Any]:
    k = len(classes)
    return {
        "accuracy": float(accuracy(preds, targets)),
        "macro_f1": float(macro_f1(preds, targets, k)),
        "per_class_f1": {c: float(f) for c, f in zip(classes, per_class_f1(preds, targets, k),
                                                     strict=True)},
        "confusion": [[int(x) for x in row] for row in confusion_matrix(preds, targets, k)],
        "classes": list(classes),
        "n": int(targets.numel()),
    }
