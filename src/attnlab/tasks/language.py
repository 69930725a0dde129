"""Language modelling (WikiText-2) and the causal token tasks (MQAR, copy, selective copy).

WikiText-2 follows pytorch/examples' word_language_model: one ``<eos>`` per line, the token
stream cut into ``batch_size`` columns and windows of ``max_len`` (no shuffling; the data
position is the window index). The reported perplexity is per token; with a sub-word
tokenizer ``word_perplexity`` normalises the same total NLL by the number of words, so
figures stay comparable with word-level results.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as nnf

from attnlab.data.batching import LMStream
from attnlab.data.synthetic import associative_recall, copy_task, selective_copy
from attnlab.data.text import load_wikitext2, wikitext_words
from attnlab.data.tokenize import EOS, train_tokenizer
from attnlab.models.lm import DecoderLM
from attnlab.tasks.common import (
    LazyBatches,
    chunks,
    epoch_order,
    eval_mode,
    run_tokenizer,
    transformer_kwargs,
)
from attnlab.train.config import ConfigError
from attnlab.train.metrics import perplexity
from attnlab.train.task import Task, register_task

__all__ = ["WikiText2", "CausalTokenTask", "MQAR", "Copy", "SelectiveCopy"]


def _decoder(task: Task, vocab_size: int, max_len: int):
    cfg = task.config
    kw = transformer_kwargs(cfg.model_kwargs, where=f"task {task.name!r}")
    return DecoderLM(vocab_size, mechanism=cfg.mechanism, mechanism_kwargs=cfg.mechanism_kwargs,
                     max_len=max_len, **kw)


@register_task
class WikiText2(Task):
    """Word- or sub-word-level language modelling on WikiText-2 (Merity et al. 2016)."""

    name = "wikitext2"
    kind = "language_model"
    metric = "perplexity"
    mode = "min"
    summary = "WikiText-2 language modelling (2M training tokens), perplexity"
    options = {"data_dir": None, "download": True, "tokenizer": "bpe", "vocab_size": 8000,
               "max_len": 128, "eval_batch_size": 16}
    defaults = {"max_steps": 1000, "batch_size": 16, "lr": 1e-3, "eval_every": 250,
                "eval_batches": 20}

    def setup(self) -> None:
        o = self.opts
        ds = load_wikitext2(o["data_dir"], download=o["download"])
        lines = {s: ds.splits[s].texts[0].split("\n") for s in ds.splits}
        kw: dict[str, Any] = {"vocab_size": o["vocab_size"], "lowercase": False}
        if o["tokenizer"] == "word":  # already tokenized text: split on spaces only
            kw["pre_tokenizer"] = "whitespace_split"
        self.tokenizer = run_tokenizer(self.run_dir, "tokenizer", lambda: train_tokenizer(
            o["tokenizer"], lines["train"], **kw))
        self.streams, self.words = {}, {}
        for split, ls in lines.items():
            # pytorch/examples: every line of the file (the last "" after the final newline
            # excepted) gets an <eos>; empty lines are just <eos>.
            ls = ls[:-1] if ls and ls[-1] == "" else ls
            ids: list[int] = []
            for enc in self.tokenizer.encode_batch(ls):
                ids.extend(enc)
                ids.append(EOS)
            self.words[split] = len(wikitext_words(ds.splits[split].texts[0]))
            self.streams[split] = torch.tensor(ids, dtype=torch.long)
        self.train_stream = LMStream(self.streams["train"], self.config.batch_size, o["max_len"])
        self._info = {"dataset": "wikitext2", "source": ds.source, "notes": list(ds.notes),
                      "tokenizer": o["tokenizer"], "vocab_size": self.tokenizer.vocab_size,
                      "tokens": {s: int(t.numel()) for s, t in self.streams.items()},
                      "words": self.words, "max_len": o["max_len"]}
        self.save_json("data.json", self._info)

    def info(self) -> dict[str, Any]:
        return self._info

    def build_model(self):
        return _decoder(self, self.tokenizer.vocab_size, self.opts["max_len"])

    def train_batches(self, epoch: int):
        stream = self.train_stream
        return LazyBatches(len(stream),
                           lambda i: dict(zip(("x", "y"), stream.batch(i), strict=True)))

    def loss(self, model, batch):
        logits = model(batch["x"])
        return nnf.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten()), \
            batch["y"].numel()

    def evaluate(self, model, split, max_batches=None):
        batches, whole = self.eval_batches(split, max_batches)
        device = next(model.parameters()).device
        nll, tokens = 0.0, 0
        with eval_mode(model):
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                logits = model(x).float()
                nll += nnf.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                tokens += y.numel()
        return self.score(split, nll, tokens, whole)

    def eval_batches(self, split: str, max_batches: int | None = None):
        """``(batches, whole)``: the evaluation batches of ``split``, ``(x, y)`` inputs and
        next-token targets made as they are drawn, and whether they are the whole split."""
        stream = LMStream(self.streams[split], self.opts["eval_batch_size"], self.opts["max_len"])
        n = len(stream) if max_batches is None else min(len(stream), max_batches)
        return (stream.batch(i) for i in range(n)), n == len(stream)

    def score(self, split: str, nll: float, tokens: int, whole: bool) -> dict[str, Any]:
        """The metrics of a summed negative log-likelihood ``nll`` over ``tokens`` targets
        of ``split``: what context parallelism sums over the shards of the batches."""
        out = {"loss": nll / tokens, "perplexity": float(perplexity(nll, tokens)),
               "tokens": tokens}
        if whole:  # the whole split: the word count is known exactly
            covered = tokens / self.streams[split].numel()
            out["word_perplexity"] = float(perplexity(nll, self.words[split] * covered))
        return out


class CausalTokenTask(Task):
    """Generated token tasks answered by a causal decoder at the last positions."""

    kind = "sequence"
    metric = "accuracy"
    count_unit = "tokens"
    options: dict[str, Any] = {"n_train": 20000, "n_validation": 1000, "n_test": 1000,
                               "data_seed": 0, "vocab": 10}
    defaults = {"max_steps": 2000, "batch_size": 64, "lr": 1e-3, "eval_every": 250}

    def generate(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def total_vocab(self) -> int:
        """Token ids the generated rows use (the model's vocabulary)."""
        return self.opts["vocab"]

    def setup(self) -> None:
        o = self.opts
        for k in ("n_train", "n_validation", "n_test"):
            if not isinstance(o[k], int) or o[k] < 1:
                raise ConfigError(f"task {self.name!r}: {k} must be an int >= 1; got {o[k]!r}")
        sizes = {"train": o["n_train"], "validation": o["n_validation"], "test": o["n_test"]}
        self.data = {s: self.generate(n, o["data_seed"] * 3 + i)
                     for i, (s, n) in enumerate(sizes.items())}
        x, y = self.data["train"]
        self.vocab = self.total_vocab()  # the generator's, specials included
        self._info = {"sizes": sizes, "length": x.shape[1], "answers": y.shape[1],
                      "vocab": self.vocab, "options": dict(o)}
        self.save_json("data.json", self._info)

    def info(self) -> dict[str, Any]:
        return self._info

    def build_model(self):
        return _decoder(self, self.vocab, self.data["train"][0].shape[1])

    def _batch(self, split: str, g: list[int]) -> dict[str, torch.Tensor]:
        x, y = self.data[split]
        return {"x": x[g], "y": y[g]}

    def train_batches(self, epoch: int):
        n = self.data["train"][0].shape[0]
        groups = chunks(epoch_order(n, self.config.seed, epoch), self.config.batch_size)
        return LazyBatches(len(groups), lambda i: self._batch("train", groups[i]))

    def _answer_logits(self, model, x: torch.Tensor, answers: int) -> torch.Tensor:
        return model(x)[:, -answers:].float()

    def loss(self, model, batch):
        y = batch["y"]
        logits = self._answer_logits(model, batch["x"], y.shape[1])
        return nnf.cross_entropy(logits.flatten(0, 1), y.flatten()), batch["x"].numel()

    def evaluate(self, model, split, max_batches=None):
        x, y = self.data[split]
        groups = chunks(range(x.shape[0]), 2 * self.config.batch_size)[:max_batches]
        device = next(model.parameters()).device
        right, rows, total = 0, 0, 0
        with eval_mode(model):
            for g in groups:
                yy = y[g].to(device)
                pred = self._answer_logits(model, x[g].to(device), y.shape[1]).argmax(-1)
                ok = pred == yy
                right += int(ok.sum())
                rows += int(ok.all(dim=1).sum())
                total += len(g)
        return {"accuracy": right / (total * y.shape[1]), "sequence_accuracy": rows / total}


@register_task
class MQAR(CausalTokenTask):
    """Multi-query associative recall (Arora et al. 2023)."""

    name = "mqar"
    summary = "Multi-query associative recall: return the value paired with each queried key"
    options = {**CausalTokenTask.options, "num_pairs": 16, "num_queries": 4, "vocab": 64,
               "bound_pairs": False, "length": None}

    def generate(self, n, seed):
        o = self.opts
        return associative_recall(n, num_pairs=o["num_pairs"], vocab=o["vocab"],
                                  num_queries=o["num_queries"], seed=seed,
                                  bound=o["bound_pairs"], length=o["length"])

    def total_vocab(self) -> int:
        o = self.opts
        filler = o["length"] is not None  # one more id: the filler between the pairs
        if not o["bound_pairs"]:
            return o["vocab"] + filler
        half = o["vocab"] // 2  # keys, then a token per (key, value) pair, then the values
        return half + half * (o["vocab"] - half) + (o["vocab"] - half) + filler


@register_task
class Copy(CausalTokenTask):
    """Copy a sequence after a delimiter."""

    name = "copy"
    summary = "Copy L tokens after a delimiter (memory over L positions)"
    options = {**CausalTokenTask.options, "length": 32, "vocab": 10}

    def generate(self, n, seed):
        return copy_task(n, length=self.opts["length"], vocab=self.opts["vocab"], seed=seed)


@register_task
class SelectiveCopy(CausalTokenTask):
    """Selective copy (Gu & Dao 2023): data tokens among noise, reproduced in order."""

    name = "selective_copy"
    summary = "Selective copy: reproduce the scattered data tokens in order"
    options = {**CausalTokenTask.options, "length": 64, "num_tokens": 8, "vocab": 10}

    def generate(self, n, seed):
        o = self.opts
        return selective_copy(n, length=o["length"], num_tokens=o["num_tokens"],
                              vocab=o["vocab"], seed=seed)
