"""Text classification tasks: Emotions, IMDB, byte-level IMDB (LRA "Text") and ListOps.

One recipe for all: a tokenizer trained on the training split only (saved in the run
directory, reloaded on resume), sequences truncated to ``max_len`` (head, tail or
head+tail), batches bucketed by length so short texts do not pay for long ones, and an
encoder classifier (any mechanism) or the LSTM baseline. Metrics: accuracy, macro-F1,
per-class F1 and the confusion matrix.

IMDB also takes model ``"han"``, the Hierarchical Attention Network (Yang et al. 2016):
each review is cut into sentences (:func:`split_sentences`), at most ``max_sentences`` of
them kept (by ``truncate``: head, tail or head+tail, as tokens are for the other models)
and at most ``max_words`` words of each (the first); the tokenizer is trained on the
training split's sentences, batches are ``(B, S, T)`` documents x sentences x words,
bucketed by sentence count.

Starting from a pre-trained run (``init_from``, e.g. an ``mlm`` run): the embeddings are
indexed by that run's token ids, so its ``tokenizer/`` is used instead of training one
(the ``tokenizer``/``vocab_size``/``min_frequency``/``lowercase`` options then do not
apply), copied into this run's directory and named in ``data.json`` (``tokenizer_from``).
A source without a tokenizer is refused, and so is one whose embedding or encoder weights
would load only in part (another ``d_model``, ``num_heads``, ``d_ff``, mechanism, or
``max_len`` with learned positions) or whose ``positions`` differ
(:func:`attnlab.tasks.mlm.check_pretrained_weights`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as nnf

from attnlab.data.batching import TRUNCATE_MODES, BucketBatchSampler, pad_batch
from attnlab.data.splits import split_manifest
from attnlab.data.synthetic import listops
from attnlab.data.text import TextDataset, TextSplit, load_emotions, load_imdb
from attnlab.data.tokenize import CLS, PAD, UNK, train_tokenizer
from attnlab.models.classifier import EncoderClassifier
from attnlab.models.han import HierarchicalAttentionNetwork
from attnlab.models.recurrent import LSTMClassifier
from attnlab.tasks.common import (
    LazyBatches,
    chunks,
    classification_report,
    eval_mode,
    run_tokenizer,
    transformer_kwargs,
)
from attnlab.tasks.mlm import check_pretrained_weights, pretrained_tokenizer
from attnlab.train.config import ConfigError
from attnlab.train.task import Task, register_task

__all__ = ["TextClassification", "Emotions", "IMDB", "TextBytes", "ListOps", "split_sentences"]

# A sentence ends at . ! ? (a run of them, maybe closed by a quote or bracket) followed by
# whitespace, or at an HTML line break (IMDB's <br />, which is dropped).
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+|<br\s*/?>", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: cut after ``.``, ``!`` or ``?`` (optionally followed by a
    closing quote or bracket) and whitespace, and at ``<br />`` tags; each stripped, empty
    ones dropped. ``"Great film! I loved it.<br /><br />Go"`` -> ``["Great film!", "I loved
    it.", "Go"]``. A rule, not a parser: "Mr. Smith" is cut after "Mr."."""
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]


def _keep(seq: list, budget: int, mode: str) -> list:
    """At most ``budget`` items: the first, the last, or (``head+tail``) the first quarter
    and the last three quarters of the budget, as token truncation does."""
    if len(seq) <= budget:
        return list(seq)
    head = {"head": budget, "tail": 0, "head+tail": budget // 4}[mode]
    return list(seq[:head]) + list(seq[len(seq) - (budget - head):])


class TextClassification(Task):
    """Base of the text classification tasks; subclasses implement :meth:`load`."""

    kind = "classification"
    metric = "accuracy"
    models = ("transformer", "lstm")
    count_unit = "tokens"
    options: dict[str, Any] = {
        "data_dir": None, "tokenizer": "word", "vocab_size": 20000, "min_frequency": 1,
        "lowercase": True, "max_len": 128, "truncate": "head", "pooling": "mean",
        "download": True, "pad_multiple": 1,
    }

    tokenizer_kwargs: dict[str, Any] = {}  # fixed by the task, e.g. ListOps' pre-tokenizer

    def load(self):  # -> attnlab.data.text.TextDataset
        raise NotImplementedError

    def _tokenizer(self, train_texts: list[str]):
        # init_from: its run's tokenizer (module docstring), the weights checked in
        # build_model on a fresh start only (a finished run may outlive its source); a
        # resumed or finished run reads its own copy
        self.tokenizer_from, self._check_source = self.config.init_from, None

        def make():
            if self.config.init_from:
                tok, _ = pretrained_tokenizer(self.config.init_from, f"task {self.name!r}")
                self._check_source = self.config.init_from
                return tok
            kwargs = {k: self.opts[k] for k in ("vocab_size", "min_frequency", "lowercase")
                      if k in self.opts}
            kwargs.update(self.tokenizer_kwargs)
            if self.opts["tokenizer"] == "byte":  # nothing to learn: 256 bytes + specials
                kwargs = {"lowercase": self.opts["lowercase"]}
            return train_tokenizer(self.opts["tokenizer"], train_texts, **kwargs)

        return run_tokenizer(self.run_dir, "tokenizer", make)

    def setup(self) -> None:
        max_len = self.opts["max_len"]
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
            raise ConfigError(f"task {self.name!r}: max_len must be an int >= 2; got {max_len!r}")
        pm = self.opts["pad_multiple"]
        if not isinstance(pm, int) or isinstance(pm, bool) or pm < 1 or max_len % pm:
            raise ConfigError(f"task {self.name!r}: pad_multiple must be an int >= 1 that "
                              f"divides max_len={max_len}; got {pm!r}")
        if self.opts["pooling"] not in ("cls", "mean", "attention"):
            raise ConfigError(f"task {self.name!r}: pooling must be 'cls', 'mean' or "
                              f"'attention'; got {self.opts['pooling']!r}")
        ds = self.load()
        self.dataset = ds
        self.classes = tuple(ds.classes)
        if self.config.model == "han":
            return self._setup_sentences(ds)
        self.tokenizer = self._tokenizer(ds.splits["train"].texts)
        self.pad_id = PAD
        self.prepend = CLS if (self.config.model == "transformer"
                               and self.opts["pooling"] == "cls") else None
        self.ids: dict[str, list[list[int]]] = {}
        self.labels: dict[str, torch.Tensor] = {}
        truncated = {}
        for split, part in ds.splits.items():
            ids = self.tokenizer.encode_batch(list(part.texts))
            self.ids[split] = ids
            self.labels[split] = torch.tensor(part.labels, dtype=torch.long)
            extra = 1 if self.prepend is not None else 0
            truncated[split] = sum(len(x) + extra > max_len for x in ids)
        self.lengths = {s: [min(len(x) + (self.prepend is not None), max_len) for x in ids]
                        for s, ids in self.ids.items()}
        self._info = {
            "dataset": ds.name, "source": ds.source, "notes": list(ds.notes),
            "classes": list(self.classes),
            "sizes": {s: len(v) for s, v in self.ids.items()},
            "tokenizer": self.tokenizer.kind, "vocab_size": self.tokenizer.vocab_size,
            "tokenizer_from": self.tokenizer_from,
            "max_len": max_len, "truncated": truncated,
            "mean_tokens": {s: sum(map(len, v)) / max(1, len(v)) for s, v in self.ids.items()},
            "manifest": split_manifest({s: list(p.texts) for s, p in ds.splits.items()}),
        }
        self.save_json("data.json", self._info)

    def _setup_sentences(self, ds) -> None:
        """Model ``han``: documents as lists of sentences of token ids (module docstring)."""
        limits = {k: self.opts[k] for k in ("max_sentences", "max_words")}
        for k, v in limits.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"task {self.name!r}: {k} must be an int >= 1; got {v!r}")
        if self.opts["truncate"] not in TRUNCATE_MODES:
            raise ConfigError(f"task {self.name!r}: truncate must be one of {TRUNCATE_MODES}; "
                              f"got {self.opts['truncate']!r}")
        docs = {s: [split_sentences(t) for t in part.texts] for s, part in ds.splits.items()}
        self.tokenizer = self._tokenizer([x for d in docs["train"] for x in d])
        self.pad_id, self.prepend = PAD, None
        self.ids, self.labels, cut = {}, {}, {"sentences": {}, "words": {}}
        for split, part in ds.splits.items():
            flat = self.tokenizer.encode_batch([x for d in docs[split] for x in d])
            out, i = [], 0
            for d in docs[split]:
                sents = [x for x in flat[i:i + len(d)] if x] or [[UNK]]  # never empty
                i += len(d)
                out.append([x[:limits["max_words"]] for x in _keep(
                    sents, limits["max_sentences"], self.opts["truncate"])])
            cut["sentences"][split] = sum(len(d) > limits["max_sentences"] for d in docs[split])
            cut["words"][split] = sum(len(x) > limits["max_words"] for x in flat)
            self.ids[split] = out
            self.labels[split] = torch.tensor(part.labels, dtype=torch.long)
        self.lengths = {s: [len(d) for d in v] for s, v in self.ids.items()}
        self._info = {
            "dataset": ds.name, "source": ds.source, "classes": list(self.classes),
            "notes": [*ds.notes, "model han: sentences split on . ! ? and <br />"],
            "sizes": {s: len(v) for s, v in self.ids.items()},
            "tokenizer": self.tokenizer.kind, "vocab_size": self.tokenizer.vocab_size,
            "tokenizer_from": self.tokenizer_from,
            **limits, "truncated": cut,
            "mean_sentences": {s: sum(map(len, docs[s])) / max(1, len(docs[s])) for s in docs},
            "manifest": split_manifest({s: list(p.texts) for s, p in ds.splits.items()}),
        }
        self.save_json("data.json", self._info)

    def info(self) -> dict[str, Any]:
        return {k: v for k, v in self._info.items() if k != "manifest"}

    def build_model(self):
        cfg = self.config
        if cfg.model == "lstm":
            kw = transformer_kwargs(cfg.model_kwargs, ("d_model", "hidden", "num_layers",
                                                      "bidirectional", "dropout"),
                                    where=f"task {self.name!r} model 'lstm'")
            return LSTMClassifier(self.tokenizer.vocab_size, len(self.classes),
                                  pad_id=self.pad_id, **kw)
        if cfg.model == "han":
            kw = transformer_kwargs(cfg.model_kwargs, ("d_model", "hidden", "num_layers",
                                                      "dropout"),
                                    where=f"task {self.name!r} model 'han'")
            return HierarchicalAttentionNetwork(self.tokenizer.vocab_size, len(self.classes),
                                                pad_id=self.pad_id, **kw)
        kw = transformer_kwargs(cfg.model_kwargs, where=f"task {self.name!r}")
        model = EncoderClassifier(self.tokenizer.vocab_size, len(self.classes),
                                  pooling=self.opts["pooling"], mechanism=cfg.mechanism,
                                  mechanism_kwargs=cfg.mechanism_kwargs,
                                  max_len=self.opts["max_len"], pad_id=self.pad_id, **kw)
        if getattr(self, "_check_source", None):  # a fresh start from pre-trained weights
            check_pretrained_weights(model, self._check_source, f"task {self.name!r}")
        return model

    def _batch(self, split: str, group: list[int]) -> dict[str, torch.Tensor]:
        if self.config.model == "han":
            return self._sentence_batch(split, group)
        ids, pad = pad_batch([self.ids[split][i] for i in group], pad_id=self.pad_id,
                             max_len=self.opts["max_len"], truncate=self.opts["truncate"],
                             prepend=self.prepend, multiple=self.opts["pad_multiple"])
        return {"ids": ids, "padding_mask": pad, "labels": self.labels[split][group]}

    def _sentence_batch(self, split: str, group: list[int]) -> dict[str, torch.Tensor]:
        """``ids`` ``(B, S, T)`` right-padded (words in a sentence, sentences in a document)
        and ``padding_mask`` (True = pad), as :class:`HierarchicalAttentionNetwork` takes."""
        docs = [self.ids[split][i] for i in group]
        S, T = max(map(len, docs)), max(len(x) for d in docs for x in d)
        ids = torch.full((len(docs), S, T), self.pad_id, dtype=torch.long)
        pad = torch.ones(len(docs), S, T, dtype=torch.bool)
        for b, d in enumerate(docs):
            for s, x in enumerate(d):
                ids[b, s, :len(x)] = torch.as_tensor(x, dtype=torch.long)
                pad[b, s, :len(x)] = False
        return {"ids": ids, "padding_mask": pad, "labels": self.labels[split][group]}

    def train_batches(self, epoch: int):
        sampler = BucketBatchSampler(self.lengths["train"], self.config.batch_size,
                                     shuffle=True, seed=self.config.seed)
        sampler.set_epoch(epoch)
        groups = list(sampler)
        return LazyBatches(len(groups), lambda i: self._batch("train", groups[i]))

    def loss(self, model, batch):
        logits = model(batch["ids"], batch["padding_mask"])
        tokens = int((~batch["padding_mask"]).sum())
        return nnf.cross_entropy(logits.float(), batch["labels"]), tokens

    def eval_groups(self, split: str, max_batches: int | None = None) -> list[list[int]]:
        order = sorted(range(len(self.ids[split])), key=lambda i: self.lengths[split][i])
        groups = chunks(order, 2 * self.config.batch_size)
        return groups[:max_batches] if max_batches else groups

    def eval_batches(self, split: str, max_batches: int | None = None):
        groups = self.eval_groups(split, max_batches)
        return LazyBatches(len(groups), lambda i: self._batch(split, groups[i]))

    def logits(self, model, batch):
        device = next(model.parameters()).device
        return (model(batch["ids"].to(device), batch["padding_mask"].to(device)),
                batch["labels"].to(device))

    def predict(self, model, split: str, max_batches: int | None = None):
        preds, targets = [], []
        with eval_mode(model):
            for b in self.eval_batches(split, max_batches):
                logits, labels = self.logits(model, b)
                preds.append(logits.argmax(-1).cpu())
                targets.append(labels.cpu())
        return torch.cat(preds), torch.cat(targets)

    def evaluate(self, model, split, max_batches=None):
        preds, targets = self.predict(model, split, max_batches)
        return classification_report(preds, targets, self.classes)

    def explain(self, model, text: str) -> dict[str, Any]:
        """Class probabilities and per-layer attention weights ``(H, N, N)`` for one text,
        with its tokens as the model saw them (truncated like the training data)."""
        if not hasattr(model, "attention_maps"):
            raise ConfigError(f"model {self.config.model!r} has no attention to show")
        if self.config.model == "han":
            raise ConfigError("model 'han' weighs words and sentences, not token pairs: see "
                              "HierarchicalAttentionNetwork.attention_maps")
        ids, pad = pad_batch([self.tokenizer.encode(text)], pad_id=self.pad_id,
                             max_len=self.opts["max_len"], truncate=self.opts["truncate"],
                             prepend=self.prepend, multiple=self.opts["pad_multiple"])
        device = next(model.parameters()).device
        ids, pad = ids.to(device), pad.to(device)
        n = int((~pad[0]).sum())  # the real tokens (pad_multiple may add padding)
        maps = [m[0, :, :n, :n].cpu() for m in model.attention_maps(ids, pad)]
        with eval_mode(model):
            probs = model(ids, pad).float().softmax(-1)[0].cpu()
        tokens = [self.tokenizer.id_to_token(i) or "?" for i in ids[0, :n].tolist()]
        return {"tokens": tokens, "attention": maps,
                "probabilities": dict(zip(self.classes, probs.tolist(), strict=True))}


@register_task
class Emotions(TextClassification):
    """Emotions in text (6 classes): dair-ai's split, Kaggle CSV rows mapped onto it."""

    name = "emotions"
    summary = "Emotion of short English texts, 6 classes (dair-ai / Kaggle 'Emotions in text')"
    # Defaults = the configuration of the figure in docs/training.md (test accuracy 0.90+):
    # a small one-layer model with attention pooling; rare words (seen once) become UNK.
    options = {**TextClassification.options, "max_len": 64, "source": "auto",
               "extra_rows": "train", "pooling": "attention", "min_frequency": 2}
    defaults = {"max_steps": 3000, "batch_size": 64, "lr": 1e-3, "eval_every": 250,
                "model_kwargs": {"d_model": 64, "num_layers": 1, "dropout": 0.3}}

    def load(self):
        return load_emotions(self.opts["data_dir"], source=self.opts["source"],
                             extra_rows=self.opts["extra_rows"], seed=self.config.seed,
                             download=self.opts["download"])


@register_task
class IMDB(TextClassification):
    """IMDB movie reviews, positive/negative, official 25k/25k split."""

    name = "imdb"
    summary = "Sentiment of IMDB movie reviews (50k, 2 classes), long texts"
    models = ("transformer", "lstm", "han")
    options = {**TextClassification.options, "max_len": 512, "truncate": "head+tail",
               "tokenizer": "wordpiece", "vocab_size": 16000, "validation_fraction": 0.1,
               "max_sentences": 32, "max_words": 64}  # the last two: model "han" only
    defaults = {"max_steps": 3000, "batch_size": 32, "lr": 5e-4, "eval_every": 500,
                "eval_batches": 20, "model_kwargs": {"d_model": 64, "num_layers": 1}}

    def load(self):
        # han splits sentences at <br /> itself (split_sentences): keep the tags for it.
        return load_imdb(self.opts["data_dir"], seed=0,
                         validation_fraction=self.opts["validation_fraction"],
                         download=self.opts["download"], clean_html=self.config.model != "han")


@register_task
class TextBytes(IMDB):
    """LRA "Text" (Tay et al. 2021, Sec. 3.3): IMDB as bytes, long sequences, no tokenizer."""

    name = "text_bytes"
    summary = "Byte-level IMDB sentiment (Long Range Arena 'Text'), up to 1-4K bytes"
    models = TextClassification.models  # bytes: no words to build sentences of
    options = {**IMDB.options, "tokenizer": "byte", "max_len": 1024, "truncate": "head",
               "lowercase": False}
    defaults = {"max_steps": 2000, "batch_size": 16, "lr": 5e-4, "eval_every": 500,
                "model_kwargs": {"d_model": 64, "num_layers": 1}}


@register_task
class ListOps(TextClassification):
    """ListOps (Nangia & Bowman 2018) with LRA's generator grammar, generated in memory."""

    name = "listops"
    summary = "LRA ListOps: evaluate nested MAX/MIN/MED/SM lists, 10 classes"
    options = {**{k: v for k, v in TextClassification.options.items()
                  if k not in ("data_dir", "download", "vocab_size", "min_frequency")},
               "tokenizer": "word", "lowercase": False, "max_len": 256, "pooling": "mean",
               "n_train": 20000, "n_validation": 2000, "n_test": 2000, "min_length": 16,
               "max_depth": 10, "max_args": 10, "data_seed": 0}
    defaults = {"max_steps": 3000, "batch_size": 32, "lr": 5e-4, "eval_every": 500,
                "model_kwargs": {"d_model": 64, "num_layers": 2}}

    def load(self):
        o = self.opts
        sizes = {"train": o["n_train"], "validation": o["n_validation"], "test": o["n_test"]}
        splits = {}
        for i, (split, n) in enumerate(sizes.items()):
            # the CLS token, when pooling uses one, must fit in max_len too: never truncate
            longest = o["max_len"] - (o["pooling"] == "cls")
            ex = listops(n, max_depth=o["max_depth"], max_args=o["max_args"],
                         max_length=longest, min_length=o["min_length"],
                         seed=o["data_seed"] * 3 + i)
            splits[split] = TextSplit([e for e, _ in ex], [y for _, y in ex])
        return TextDataset("listops", tuple(str(d) for d in range(10)), splits,
                           f"generated: attnlab.data.synthetic.listops, data_seed "
                           f"{o['data_seed']}", (f"lengths {o['min_length']}-{o['max_len']}",))

    # one token per symbol: split on spaces only ("[MAX" stays whole), keep every symbol
    tokenizer_kwargs = {"pre_tokenizer": "whitespace_split", "vocab_size": None,
                        "min_frequency": 1}
