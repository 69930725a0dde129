"""A translation-like task for the encoder-decoder: copy, reverse or sort a token sequence.

Trained with teacher forcing (decoder input ``[BOS] + y``, labels ``y + [EOS]``), scored by
greedy decoding: token accuracy against the reference and exact-match sequence accuracy.

``--mechanism`` is the encoder's and decoder's self-attention; the decoder's cross-attention
is a model option of its own, ``--model-opt cross_mechanism=NAME`` (``"sdpa"`` by default,
any mechanism with a cross form) with ``cross_mechanism_kwargs`` (a JSON object of its
hyperparameters), e.g. ``--model-opt cross_mechanism=luong_predictive``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as nnf

from attnlab.data.seq2seq import BOS, EOS, PAD, collate, seq2seq_task
from attnlab.models.seq2seq import Seq2SeqTransformer
from attnlab.tasks.common import LazyBatches, chunks, epoch_order, eval_mode, transformer_kwargs
from attnlab.train.config import ConfigError
from attnlab.train.task import Task, register_task

__all__ = ["Seq2Seq", "TeacherForced"]

# The transformer options of every task, and the decoder's cross-attention.
_MODEL_KEYS = ("d_model", "num_heads", "num_layers", "d_ff", "dropout", "positions",
               "cross_mechanism", "cross_mechanism_kwargs")


class TeacherForced(Task):
    """What every encoder-decoder task shares: ``self.pairs[split] = (sources, targets)``
    (targets ``[BOS] + y + [EOS]``) batched by :func:`collate`, trained with teacher
    forcing: the cross-entropy of ``y + [EOS]`` given ``[BOS] + y``, padding ignored."""

    def _batch(self, split: str, g: list[int]) -> dict[str, torch.Tensor]:
        src, tgt = self.pairs[split]
        return collate([src[i] for i in g], [tgt[i] for i in g], pad_id=PAD)

    def train_batches(self, epoch: int):
        n = len(self.pairs["train"][0])
        groups = chunks(epoch_order(n, self.config.seed, epoch), self.config.batch_size)
        return LazyBatches(len(groups), lambda i: self._batch("train", groups[i]))

    def loss(self, model, batch):
        logits = model(batch["src"], batch["tgt_in"], batch["src_padding_mask"],
                       batch["tgt_padding_mask"])
        labels = batch["tgt_out"]
        loss = nnf.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                 ignore_index=PAD)
        return loss, int((labels != PAD).sum())


@register_task
class Seq2Seq(TeacherForced):
    """Sequence-to-sequence with cross-attention (Vaswani et al. 2017's encoder-decoder)."""

    name = "seq2seq"
    kind = "seq2seq"
    metric = "sequence_accuracy"
    summary = "Encoder-decoder on a generated translation-like task (reverse, sort or copy)"
    options: dict[str, Any] = {"task": "reverse", "min_len": 4, "max_len": 16, "vocab": 24,
                               "n_train": 20000, "n_validation": 1000, "n_test": 1000,
                               "data_seed": 0}
    defaults = {"max_steps": 2000, "batch_size": 64, "lr": 1e-3, "eval_every": 250}

    def __init__(self, config, run_dir=None) -> None:
        if "cross_mechanism" in config.task_kwargs:  # where it was once: say where it is now
            raise ConfigError(f"task {self.name!r}: cross_mechanism is a model option: "
                              f"--model-opt cross_mechanism=NAME (model_kwargs)")
        super().__init__(config, run_dir)

    def setup(self) -> None:
        o = self.opts
        sizes = {"train": o["n_train"], "validation": o["n_validation"], "test": o["n_test"]}
        self.pairs = {s: seq2seq_task(n, task=o["task"], min_len=o["min_len"],
                                      max_len=o["max_len"], vocab=o["vocab"],
                                      seed=o["data_seed"] * 3 + i)
                      for i, (s, n) in enumerate(sizes.items())}
        self._info = {"sizes": sizes, "options": dict(o)}
        self.save_json("data.json", self._info)

    def info(self) -> dict[str, Any]:
        return self._info

    def build_model(self):
        cfg, o = self.config, self.opts
        kw = transformer_kwargs(cfg.model_kwargs, _MODEL_KEYS, where=f"task {self.name!r}")
        return Seq2SeqTransformer(o["vocab"], o["vocab"], mechanism=cfg.mechanism,
                                  mechanism_kwargs=cfg.mechanism_kwargs,
                                  max_len=o["max_len"] + 2, **kw)

    def evaluate(self, model, split, max_batches=None):
        src, tgt = self.pairs[split]
        groups = chunks(range(len(src)), 2 * self.config.batch_size)[:max_batches]
        device = next(model.parameters()).device
        right = total = exact = rows = 0
        with eval_mode(model):
            for g in groups:
                b = self._batch(split, g)
                out = model.greedy_decode(b["src"].to(device), self.opts["max_len"] + 1, BOS,
                                          EOS, b["src_padding_mask"].to(device)).cpu()
                for row, i in zip(out.tolist(), g, strict=True):
                    want = tgt[i][1:]                      # y + [EOS]
                    got = (row[1:] + [PAD] * len(want))[:len(want)]
                    right += sum(a == b for a, b in zip(got, want, strict=True))
                    total += len(want)
                    exact += got == want
                    rows += 1
        return {"accuracy": right / total, "sequence_accuracy": exact / rows}
