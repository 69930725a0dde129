"""Masked-language-model pre-training (BERT, Devlin et al. 2019), task ``mlm``.

The corpus (``corpus``: WikiText-2 by default, or the training split of ``emotions`` /
``imdb``) is tokenized into one stream (WordPiece by default, ``vocab_size`` ids, the
tokenizer trained on the training split and saved in the run directory), cut into
non-overlapping windows of ``max_len`` tokens. With ``cls`` (default) each window is
``[CLS]`` + ``max_len - 1`` tokens: a classifier fine-tuned from this encoder with
``pooling="cls"`` then reads a token the encoder has always seen at position 0 (it is never
masked, like every special). WikiText-2's markup is undone first (``@-@`` -> ``-``, ``@,@`` ->
``,``, ``@.@`` -> ``.``) and its ``<unk>`` becomes the UNK id, not three word pieces.

Masks (:func:`attnlab.data.mlm.mask_tokens`: 15 % chosen, 80/10/10) are drawn afresh for
every training batch from a generator seeded by ``(seed, epoch, batch index)`` only, so a
resumed run replays exactly the batches it would have seen. Validation and test use one
fixed masking, seeded by ``eval_seed`` (not by the run's seed: every run is scored on the
same masked positions). Metrics: ``mlm_accuracy`` (argmax correct at the masked
positions) and ``mlm_perplexity`` (exp of their mean NLL), the primary one (``min``): it
is the quantity training minimises and varies smoothly where accuracy moves in steps.

A classifier starts from the encoder with ``init_from`` (``attnlab train --task emotions
--init-from RUN``): the text tasks then use the source run's tokenizer
(:func:`pretrained_tokenizer`) and refuse weights that would load only in part
(:func:`check_pretrained_weights`), see :mod:`attnlab.tasks.text`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab.data.mlm import IGNORE_INDEX, mask_tokens, mlm_loss
from attnlab.data.text import load_emotions, load_imdb, load_wikitext2
from attnlab.data.tokenize import CLS, PAD, UNK, load_tokenizer, train_tokenizer
from attnlab.models.mlm import MaskedLM
from attnlab.tasks.common import (
    LazyBatches,
    chunks,
    epoch_order,
    eval_mode,
    run_tokenizer,
    transformer_kwargs,
)
from attnlab.train.checkpoint import CheckpointError, load_checkpoint
from attnlab.train.config import ConfigError, read_run_config
from attnlab.train.metrics import perplexity
from attnlab.train.task import Task, register_task

__all__ = ["MaskedLanguageModel", "check_pretrained_weights", "pretrained_tokenizer",
           "wikitext_lines"]

CORPORA = ("wikitext2", "emotions", "imdb")
_UNK_MARK = "<unk>"  # WikiText-2's own unknown-word token
_SPLITS = ("train", "validation", "test")


def wikitext_lines(text: str) -> list[str]:
    """The non-empty lines of a tokenized WikiText-2 file, its ``@-@``, ``@,@`` and ``@.@``
    joined back (``"1 @,@ 000"`` -> ``"1,000"``); ``<unk>`` is kept for the caller."""
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if line:
            out.append(line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", "."))
    return out


def _source_dir(init_from: str) -> Path:
    """The run directory of ``init_from`` (a run directory, or a checkpoint file in one)."""
    path = Path(init_from)
    if not path.exists():
        raise ConfigError(f"init_from: {path} does not exist (a run directory or a .pt "
                          f"checkpoint expected)")
    return path if path.is_dir() else path.parent


def pretrained_tokenizer(init_from: str, who: str):
    """``(tokenizer, run directory)`` of the run ``init_from`` starts from: its embeddings
    are indexed by that tokenizer's ids, so a task starting from it must encode with it.
    A ``ConfigError`` when the run saved none (not a text run, or a multi-seed folder)."""
    src = _source_dir(init_from)
    if not (src / "tokenizer").is_dir():
        seeds = sorted(p for p in src.glob("seed-*") if (p / "tokenizer").is_dir())
        hint = (f"; pass one seed's directory, e.g. {seeds[0]}" if seeds else
                "; start from a text run (mlm, emotions, imdb, ...), whose tokenizer indexes "
                "the embeddings")
        raise ConfigError(f"{who}: init_from {init_from} has no saved tokenizer "
                          f"({src / 'tokenizer'} is missing), so its token embeddings "
                          f"cannot be matched to this task's ids{hint}")
    return load_tokenizer(src / "tokenizer"), src


def check_pretrained_weights(model, init_from: str, who: str) -> None:
    """Refuse a source whose embedding or encoder weights would load only in part into
    ``model`` (``init_weights`` loads what matches and leaves the rest at initialisation):
    another ``d_model``, ``max_len`` with learned positions, ``num_heads``, ``d_ff`` or
    mechanism parameters, or another ``positions`` (no weights, same shapes). A file that
    cannot be read is left to ``init_weights``, which names the problem."""
    src = Path(init_from)
    path = src / "best.pt" if src.is_dir() else src
    try:
        weights = load_checkpoint(path)["model"]
    except (CheckpointError, KeyError, OSError):
        return
    own = model.state_dict()
    bad = sorted(k for k, v in weights.items() if k.startswith(("embed.", "encoder."))
                 and k in own and own[k].shape != v.shape)
    if bad:
        shapes = ", ".join(f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
                           for k in bad[:3])
        raise ConfigError(f"{who}: init_from {path}: {len(bad)} encoder weight(s) have other "
                          f"shapes in this model ({shapes}{', ...' if len(bad) > 3 else ''}): "
                          f"use the pre-training run's d_model, num_heads, d_ff, mechanism "
                          f"and, with learned positions, max_len")
    if (_source_dir(init_from) / "config.json").is_file():
        theirs = read_run_config(_source_dir(init_from)).model_kwargs.get("positions",
                                                                          "sinusoidal")
        ours = model.config.get("positions", "sinusoidal")
        if theirs != ours:
            raise ConfigError(f"{who}: init_from {init_from} was trained with positions="
                              f"{theirs!r}, this model has {ours!r}: its encoder would read "
                              f"positions it never learned; pass --model-opt "
                              f"positions={theirs}")


def _seed(*parts: int) -> int:
    """A 64-bit seed that depends on every part (no collisions of simple sums)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


@register_task
class MaskedLanguageModel(Task):
    """BERT's masked-language-model objective on a text corpus (module docstring)."""

    name = "mlm"
    kind = "masked_language_model"
    metric = "mlm_perplexity"
    mode = "min"
    summary = "Masked-language-model pre-training (BERT) on WikiText-2, masked perplexity"
    options = {"data_dir": None, "download": True, "corpus": "wikitext2",
               "tokenizer": "wordpiece", "vocab_size": 8000, "lowercase": True,
               "max_len": 128, "cls": True, "mask_prob": 0.15, "eval_seed": 0}
    defaults = {"max_steps": 2000, "batch_size": 32, "lr": 1e-3, "eval_every": 250,
                "eval_batches": 20, "model_kwargs": {"d_model": 64, "num_layers": 2}}

    def _check_options(self) -> None:
        o, who = self.opts, f"task {self.name!r}"
        if o["corpus"] not in CORPORA:
            raise ConfigError(f"{who}: corpus must be one of {CORPORA}; got {o['corpus']!r}")
        if not isinstance(o["cls"], bool):
            raise ConfigError(f"{who}: cls must be a bool; got {o['cls']!r}")
        ml = o["max_len"]
        if not isinstance(ml, int) or isinstance(ml, bool) or ml < 2 + o["cls"]:
            raise ConfigError(f"{who}: max_len must be an int >= {2 + o['cls']} (a window "
                              f"of at least 2 tokens{' after [CLS]' if o['cls'] else ''}); "
                              f"got {ml!r}")
        p = o["mask_prob"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
            raise ConfigError(f"{who}: mask_prob must be a float in (0, 1); got {p!r}")
        if not isinstance(o["eval_seed"], int) or isinstance(o["eval_seed"], bool) \
                or o["eval_seed"] < 0:
            raise ConfigError(f"{who}: eval_seed must be an int >= 0; got {o['eval_seed']!r}")

    def _corpus(self) -> tuple[dict[str, list[str]], str, list[str]]:
        """``({split: texts}, source, notes)`` of the chosen corpus."""
        o = self.opts
        if o["corpus"] == "wikitext2":
            ds = load_wikitext2(o["data_dir"], download=o["download"])
            lines = {s: wikitext_lines(ds.splits[s].texts[0]) for s in _SPLITS}
            notes = [*ds.notes, "@-@ @,@ @.@ joined back; <unk> is the UNK id"]
        elif o["corpus"] == "emotions":
            ds = load_emotions(o["data_dir"], download=o["download"])
            lines, notes = {s: list(ds.splits[s].texts) for s in _SPLITS}, list(ds.notes)
        else:
            ds = load_imdb(o["data_dir"], seed=0, download=o["download"])
            lines, notes = {s: list(ds.splits[s].texts) for s in _SPLITS}, list(ds.notes)
        return lines, ds.source, notes

    def _tokenizer(self, train_lines: list[str]):
        o = self.opts

        def make():
            texts = [x.replace(_UNK_MARK, " ") for x in train_lines]
            kw = {"lowercase": o["lowercase"]} if o["tokenizer"] == "byte" else {
                "vocab_size": o["vocab_size"], "lowercase": o["lowercase"]}
            return train_tokenizer(o["tokenizer"], texts, **kw)

        tok = run_tokenizer(self.run_dir, "tokenizer", make)
        if tok.mask_id is None:
            where = self.run_dir / "tokenizer" if self.run_dir is not None else None
            raise ConfigError(f"task {self.name!r}: the tokenizer at {where} has no [MASK] "
                              f"token (saved by an older attnlab); start a new run")
        return tok

    def _stream(self, lines: list[str]) -> torch.Tensor:
        """All lines' ids, one after the other; WikiText-2's ``<unk>`` as UNK."""
        mark = _UNK_MARK if self.opts["corpus"] == "wikitext2" else None
        pieces = [line.split(mark) if mark else [line] for line in lines]
        flat = iter(self.tokenizer.encode_batch([p for ps in pieces for p in ps]))
        ids: list[int] = []
        for ps in pieces:
            for j in range(len(ps)):
                if j:
                    ids.append(UNK)
                ids.extend(next(flat))
        return torch.tensor(ids, dtype=torch.long)

    def _windows(self, split: str, stream: torch.Tensor) -> torch.Tensor:
        """``(n, max_len)`` windows of the stream, ``[CLS]`` first with ``cls``."""
        width = self.opts["max_len"] - self.opts["cls"]
        n = stream.numel() // width
        if n == 0:
            raise ConfigError(f"task {self.name!r}: the {split} split has {stream.numel()} "
                              f"tokens, fewer than one window of {width}; lower max_len")
        w = stream[:n * width].view(n, width)
        return torch.cat([torch.full((n, 1), CLS), w], 1) if self.opts["cls"] else w

    def setup(self) -> None:
        self._check_options()
        lines, source, notes = self._corpus()
        self.tokenizer = self._tokenizer(lines["train"])
        streams = {s: self._stream(lines[s]) for s in _SPLITS}
        self.windows = {s: self._windows(s, streams[s]) for s in _SPLITS}
        o = self.opts
        self._info = {"dataset": o["corpus"], "source": source, "notes": notes,
                      "tokenizer": self.tokenizer.kind, "vocab_size": self.tokenizer.vocab_size,
                      "max_len": o["max_len"], "cls": o["cls"], "mask_prob": o["mask_prob"],
                      "tokens": {s: int(t.numel()) for s, t in streams.items()},
                      "windows": {s: int(w.shape[0]) for s, w in self.windows.items()}}
        self.save_json("data.json", self._info)

    def info(self) -> dict[str, Any]:
        return self._info

    def build_model(self):
        cfg = self.config
        kw = transformer_kwargs(cfg.model_kwargs, where=f"task {self.name!r}")
        return MaskedLM(self.tokenizer.vocab_size, mechanism=cfg.mechanism,
                        mechanism_kwargs=cfg.mechanism_kwargs, max_len=self.opts["max_len"],
                        pad_id=PAD, **kw)

    def masked_batch(self, split: str, rows: list[int], seed: int) -> dict[str, torch.Tensor]:
        """Windows ``rows`` of ``split`` masked by a generator seeded with ``seed``:
        ``inputs`` (B, max_len) and ``labels`` (IGNORE_INDEX where nothing is asked)."""
        ids = self.windows[split][rows]
        inputs, labels = mask_tokens(
            ids, None, vocab_size=self.tokenizer.vocab_size, mask_id=self.tokenizer.mask_id,
            num_specials=self.tokenizer.num_specials, p=float(self.opts["mask_prob"]),
            generator=torch.Generator().manual_seed(seed))
        return {"inputs": inputs, "labels": labels}

    def train_batches(self, epoch: int):
        seed = self.config.seed
        groups = chunks(epoch_order(self.windows["train"].shape[0], seed, epoch),
                        self.config.batch_size)
        return LazyBatches(len(groups), lambda i: self.masked_batch(
            "train", groups[i], _seed(0, seed, epoch, i)))

    def loss(self, model, batch):
        labels = batch["labels"]
        where = labels != IGNORE_INDEX
        logits = model.masked_logits(batch["inputs"], where)
        return mlm_loss(logits, labels[where]), batch["inputs"].numel()

    def eval_batches(self, split: str, max_batches: int | None = None):
        groups = chunks(range(self.windows[split].shape[0]), 2 * self.config.batch_size)
        groups = groups[:max_batches] if max_batches else groups
        code = _SPLITS.index(split)
        return LazyBatches(len(groups), lambda i: self.masked_batch(
            split, groups[i], _seed(1, self.opts["eval_seed"], code, i)))

    def evaluate(self, model, split, max_batches=None):
        device = next(model.parameters()).device
        nll, right, n = 0.0, 0, 0
        with eval_mode(model):
            for b in self.eval_batches(split, max_batches):
                labels = b["labels"].to(device)
                where = labels != IGNORE_INDEX
                logits = model.masked_logits(b["inputs"].to(device), where).float()
                y = labels[where]
                nll += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                right += int((logits.argmax(-1) == y).sum())
                n += int(y.numel())
        if n == 0:
            raise ConfigError(f"task {self.name!r}: no masked position in the {split} "
                              f"batches evaluated; raise mask_prob or eval_batches")
        return {"mlm_accuracy": right / n, "mlm_perplexity": float(perplexity(nll, n)),
                "loss": nll / n, "masked_tokens": n}
