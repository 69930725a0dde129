"""Two-sequence classification: co-attention against plain cross-attention.

``fact_lookup`` (:func:`attnlab.data.pairs.fact_lookup`, generated, no download): a passage
of key-value facts and a question of a few keys, one of which occurs in the passage; the
class is that key's value. Neither side alone answers it (see the data module), so the
pairing is what is compared: ``model_kwargs={"pairing": ...}`` picks
``co_attention_parallel``, ``co_attention_alternating`` (Lu et al. 2016) or ``cross``
(the question attends the passage through ``MultiheadAttention`` with
``config.mechanism``). Metric: accuracy (chance ``1 / num_values``), with macro-F1 and
the confusion matrix; ``data.json`` records chance and, for ``answer="value"``, the best
accuracy from the passage alone on validation (a model above it reads the question too).

``config.model`` is the per-side encoder: ``lstm`` (a BiLSTM, the default) or
``transformer`` (with ``config.mechanism``). The BiLSTM is the default because a value
sits one position after its key: a BiLSTM binds the two for free, while a transformer
encoder has to learn to read the next position. In our CPU runs it never did: with the
default data and d_model 64, ``co_attention_parallel`` and ``cross`` stayed at the
passage-only accuracy (validation 0.36-0.47 along the run, passage-only 0.42) for 3000
steps, as did 1-2 layers of d_model 32 on smaller data for 1000-1400 steps.
``answer="key"`` (which question key the passage holds) needs the same matching of the two
sides and no binding; it trains with either encoder.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as nnf

from attnlab.data.pairs import PAD, PairData, fact_lookup, passage_only_accuracy
from attnlab.models.pair import PairClassifier
from attnlab.tasks.common import (
    LazyBatches,
    chunks,
    classification_report,
    epoch_order,
    eval_mode,
    transformer_kwargs,
)
from attnlab.train.config import ConfigError
from attnlab.train.task import Task, register_task

__all__ = ["FactLookup"]

_DATA_OPTIONS = ("num_keys", "num_values", "min_facts", "max_facts", "min_question",
                 "max_question", "answer")
_MODEL_KEYS = {
    "transformer": ("d_model", "num_heads", "num_layers", "d_ff", "dropout", "positions",
                    "pairing", "hidden"),
    "lstm": ("d_model", "num_heads", "num_layers", "dropout", "pairing", "hidden"),
}


@register_task
class FactLookup(Task):
    """Question/passage fact lookup; the pairing (co-attention or cross) is a model option."""

    name = "fact_lookup"
    kind = "classification"
    metric = "accuracy"
    summary = ("Question/passage pairs: the value of the one question key the passage holds "
               "(co-attention vs cross-attention)")
    models = ("lstm", "transformer")
    count_unit = "tokens"
    options: dict[str, Any] = {"n_train": 20000, "n_validation": 1000, "n_test": 1000,
                               "data_seed": 0, "num_keys": 16, "num_values": 8,
                               "min_facts": 2, "max_facts": 6, "min_question": 1,
                               "max_question": 4, "answer": "value"}
    defaults = {"model": "lstm", "max_steps": 2000, "batch_size": 64, "lr": 1e-3,
                "eval_every": 250, "model_kwargs": {"d_model": 64, "num_heads": 4, "num_layers": 1,
                                 "pairing": "co_attention_parallel"}}

    def setup(self) -> None:
        o = self.opts
        sizes = {"train": o["n_train"], "validation": o["n_validation"], "test": o["n_test"]}
        for split, n in sizes.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ConfigError(f"task {self.name!r}: n_{split} must be an int >= 1; "
                                  f"got {n!r}")
        kw = {k: o[k] for k in _DATA_OPTIONS}
        try:
            self.data: dict[str, PairData] = {
                s: fact_lookup(n, **kw, seed=o["data_seed"] * 3 + i)
                for i, (s, n) in enumerate(sizes.items())}
        except (TypeError, ValueError) as e:  # the generator names the option
            raise ConfigError(f"task {self.name!r}: {e}") from None
        train = self.data["train"]
        prefix = "v" if o["answer"] == "value" else "k"
        self.classes = tuple(f"{prefix}{i}" for i in range(train.num_classes))
        val = self.data["validation"]
        self._info = {"sizes": sizes, "vocab_size": train.vocab_size,
                      "classes": list(self.classes), "chance": 1 / train.num_classes,
                      "validation_passage_only": (passage_only_accuracy(val)
                                                  if o["answer"] == "value" else None),
                      "question_length": train.question.shape[1],
                      "passage_length": train.passage.shape[1], "options": dict(o)}
        self.save_json("data.json", self._info)

    def info(self) -> dict[str, Any]:
        return self._info

    def build_model(self):
        cfg = self.config
        kw = transformer_kwargs(cfg.model_kwargs, _MODEL_KEYS[cfg.model],
                                where=f"task {self.name!r} model {cfg.model!r}")
        train = self.data["train"]
        return PairClassifier(train.vocab_size, train.num_classes, encoder=cfg.model,
                              mechanism=cfg.mechanism, mechanism_kwargs=cfg.mechanism_kwargs,
                              max_len=max(train.question.shape[1], train.passage.shape[1]),
                              pad_id=PAD, **kw)

    def _batch(self, split: str, g: list[int]) -> dict[str, torch.Tensor]:
        """Pairs ``g`` of ``split``, each side cut to its longest real length in ``g``;
        padding masks ``True`` at padding."""
        d = self.data[split]
        out = {"labels": d.labels[g]}
        for side, ids, lengths in (("a", d.question, d.question_lengths),
                                   ("b", d.passage, d.passage_lengths)):
            n = lengths[g]
            width = int(n.max())
            out[f"{side}_ids"] = ids[g, :width]
            out[f"{side}_padding"] = torch.arange(width)[None] >= n[:, None]
        return out

    def train_batches(self, epoch: int):
        n = len(self.data["train"])
        groups = chunks(epoch_order(n, self.config.seed, epoch), self.config.batch_size)
        return LazyBatches(len(groups), lambda i: self._batch("train", groups[i]))

    @staticmethod
    def _logits(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(*(b[k].to(device) for k in ("a_ids", "b_ids", "a_padding", "b_padding")))

    def loss(self, model, batch):
        tokens = int((~batch["a_padding"]).sum() + (~batch["b_padding"]).sum())
        return nnf.cross_entropy(self._logits(model, batch).float(), batch["labels"]), tokens

    def evaluate(self, model, split, max_batches=None):
        groups = chunks(range(len(self.data[split])), 2 * self.config.batch_size)
        preds, targets = [], []
        with eval_mode(model):
            for g in groups[:max_batches] if max_batches else groups:
                b = self._batch(split, g)
                preds.append(self._logits(model, b).argmax(-1).cpu())
                targets.append(b["labels"])
        return classification_report(torch.cat(preds), torch.cat(targets), self.classes)
