"""Translation judged on decoded text: BLEU, chrF and ROUGE-L of greedy and beam search.

The corpus is ``num2words`` (numbers written in two languages, offline; see
:mod:`attnlab.data.translation`) or ``wmt14`` (local files in the Hugging Face layout,
``data_dir``). One tokenizer per side is trained on the training split only (``tokenizer``
for the source, ``tgt_tokenizer`` for the target, default the same kind; ``char`` by
default: German number names are single long words) and saved in the run directory.

The model is the encoder-decoder :class:`Seq2SeqTransformer`, trained with teacher forcing
(decoder input ``[BOS] + y``, labels ``y + [EOS]``). ``--mechanism`` is the encoder's and
the decoder's self-attention, so it needs a causal form, unless the decoder gets its own
(``--model-opt decoder_mechanism=NAME``, e.g. ``--mechanism linformer --model-opt
decoder_mechanism=sdpa``); the cross-attention is ``--model-opt cross_mechanism=NAME``, as
in ``seq2seq``.

Evaluation decodes every source (``decoding``: ``greedy`` and/or ``beam`` with
``beam_size`` and ``length_penalty``), detokenizes, and scores the text against the
reference texts (lowercased when ``lowercase``): ``bleu_<dec>``, ``chrf_<dec>``,
``rougeL_<dec>``, ``exact_<dec>`` per decoding (``<dec>`` = ``greedy``, ``beam4``, ...);
``bleu``/``chrf``/``rougeL``/``exact`` unsuffixed are the beam's when beam is decoded,
else greedy's (``bleu`` is the primary metric). ``token_accuracy`` is teacher-forced.
A few decoded examples (source, reference, each decoding) go to
``examples-<split>.json`` in the run directory.
"""

from __future__ import annotations

from typing import Any

import torch

from attnlab.data.sources import DataError
from attnlab.data.tokenize import BOS, EOS, KINDS, PAD, UNK, train_tokenizer
from attnlab.data.translation import load_wmt14, num2words_corpus
from attnlab.models.seq2seq import Seq2SeqTransformer
from attnlab.tasks.common import chunks, eval_mode, run_tokenizer, transformer_kwargs
from attnlab.tasks.seq2seq import TeacherForced
from attnlab.train.config import ConfigError
from attnlab.train.task import register_task
from attnlab.train.text_metrics import text_scores
from attnlab.util.checks import check_bool, check_choice, check_float, check_int

__all__ = ["Translation", "DECODINGS"]

DECODINGS = ("greedy", "beam")
CORPORA = ("num2words", "wmt14")
_MODEL_KEYS = ("d_model", "num_heads", "num_layers", "num_decoder_layers", "d_ff", "dropout",
               "positions", "cross_mechanism", "cross_mechanism_kwargs", "decoder_mechanism",
               "decoder_mechanism_kwargs")
_NUM2WORDS_KEYS = ("min_number", "max_number", "n_train", "n_validation", "n_test", "forms")


@register_task
class Translation(TeacherForced):
    """Encoder-decoder translation scored by BLEU / chrF / ROUGE-L of its decoded output."""

    name = "translation"
    kind = "seq2seq"
    metric = "bleu"
    summary = "Translation (num2words number names or WMT14 files), BLEU/chrF/ROUGE-L"
    options: dict[str, Any] = {
        "corpus": "num2words", "data_dir": None, "src_lang": "de", "tgt_lang": "en",
        "min_number": 0, "max_number": 9999, "n_train": None, "n_validation": 500,
        "n_test": 500, "forms": "cardinal", "data_seed": 0, "max_rows": None,
        "tokenizer": "char", "tgt_tokenizer": None, "vocab_size": None, "lowercase": False,
        "max_len": 64, "decoding": "greedy,beam", "beam_size": 4, "length_penalty": 1.0,
        "n_examples": 8,
    }
    defaults = {"max_steps": 3000, "batch_size": 64, "lr": 1e-3, "eval_every": 500}

    # ---- options and data --------------------------------------------------------------
    def _check_options(self) -> None:
        o, who = self.opts, f"task {self.name!r}"
        try:
            check_choice("corpus", o["corpus"], CORPORA, who=who)
            for key in ("tokenizer",) + (("tgt_tokenizer",) if o["tgt_tokenizer"] else ()):
                check_choice(key, o[key], KINDS, who=who)
            check_int("vocab_size", o["vocab_size"], nullable=True, who=who)
            check_bool("lowercase", o["lowercase"], who=who)
            check_int("max_len", o["max_len"], low=2, who=who)
            check_int("beam_size", o["beam_size"], who=who)
            check_float("length_penalty", o["length_penalty"], low=0.0, who=who)
            check_int("n_examples", o["n_examples"], low=0, who=who)
            check_int("data_seed", o["data_seed"], low=0, who=who)
            self.decodings = self._decodings(o["decoding"])
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        given = self.config.task_kwargs
        if o["corpus"] == "num2words" and given.get("data_dir") is not None:
            raise ConfigError(f"{who}: corpus 'num2words' is generated: data_dir does not "
                              f"apply (it is for corpus='wmt14')")
        unused = [k for k in _NUM2WORDS_KEYS if k in given] if o["corpus"] == "wmt14" else []
        if unused or (o["corpus"] == "num2words" and given.get("max_rows") is not None):
            raise ConfigError(f"{who}: option(s) {unused or ['max_rows']} do not apply to "
                              f"corpus {o['corpus']!r}")

    def _decodings(self, value) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"task {self.name!r}: decoding must be 'greedy', 'beam' or "
                             f"'greedy,beam'; got {value!r}")
        items = tuple(str(x).strip() for x in items)
        for x in items:
            check_choice("decoding", x, DECODINGS, who=f"task {self.name!r}")
        return tuple(d for d in DECODINGS if d in items)  # greedy first, no repeats

    def _corpus(self):
        o = self.opts
        src, tgt = o["src_lang"], o["tgt_lang"]
        try:
            if o["corpus"] == "wmt14":  # the hub names its pairs "xx-en"
                pair = f"{tgt}-{src}" if src == "en" else f"{src}-{tgt}"
                return load_wmt14(o["data_dir"], pair, src_lang=src, max_rows=o["max_rows"])
            return num2words_corpus(src, tgt, **{k: o[k] for k in _NUM2WORDS_KEYS},
                                    seed=o["data_seed"])
        except DataError:  # a file problem: said as it is, with the paths tried
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"task {self.name!r}: {e}") from None

    def _tokenizer(self, side: str, kind: str, texts: list[str]):
        kw = {"lowercase": self.opts["lowercase"]}
        if kind != "byte":
            kw["vocab_size"] = self.opts["vocab_size"]

        def make():
            try:
                return train_tokenizer(kind, texts, **kw)
            except ValueError as e:
                raise ConfigError(f"task {self.name!r}: {side} tokenizer: {e}") from None

        return run_tokenizer(self.run_dir, f"tokenizer-{side}", make)

    def setup(self) -> None:
        self._check_options()
        o, corpus = self.opts, self._corpus()
        train = corpus.splits["train"]
        self.src_tok = self._tokenizer("src", o["tokenizer"], train.src)
        self.tgt_tok = self._tokenizer("tgt", o["tgt_tokenizer"] or o["tokenizer"], train.tgt)
        self.pairs, self.texts, dropped, cut = {}, {}, {}, {}
        for s, part in corpus.splits.items():
            src = [x or [UNK] for x in self.src_tok.encode_batch(part.src)]
            tgt = [[BOS, *y, EOS] for y in self.tgt_tok.encode_batch(part.tgt)]
            keep = range(len(src))
            if s == "train":  # a pair longer than max_len is not trained on ...
                keep = [i for i in keep if len(src[i]) <= o["max_len"]
                        and len(tgt[i]) - 2 <= o["max_len"]]
                dropped[s] = len(src) - len(keep)
            else:  # ... nor left out of a score: its source is cut, its reference kept
                cut[s] = sum(len(x) > o["max_len"] for x in src)
            self.pairs[s] = ([src[i][:o["max_len"]] for i in keep], [tgt[i] for i in keep])
            refs = [part.tgt[i] for i in keep]
            self.texts[s] = ([part.src[i] for i in keep],
                             [r.lower() for r in refs] if o["lowercase"] else refs)
        self._info = {
            "corpus": corpus.name, "source": corpus.source, "notes": list(corpus.notes),
            "src_lang": corpus.src_lang, "tgt_lang": corpus.tgt_lang,
            "sizes": {s: len(p[0]) for s, p in self.pairs.items()},
            "vocab_size": {"src": self.src_tok.vocab_size, "tgt": self.tgt_tok.vocab_size},
            "max_len": o["max_len"], "train_dropped_too_long": dropped["train"],
            "eval_sources_truncated": cut,
            "mean_tokens": {side: sum(map(len, self.pairs["train"][j])) / max(1, len(
                self.pairs["train"][j])) for j, side in enumerate(("src", "tgt"))},
        }
        self.save_json("data.json", self._info)

    def info(self) -> dict[str, Any]:
        return self._info

    # ---- model and training ------------------------------------------------------------
    def build_model(self):
        cfg = self.config
        kw = transformer_kwargs(cfg.model_kwargs, _MODEL_KEYS, where=f"task {self.name!r}")
        try:
            return Seq2SeqTransformer(self.src_tok.vocab_size, self.tgt_tok.vocab_size,
                                      mechanism=cfg.mechanism,
                                      mechanism_kwargs=cfg.mechanism_kwargs,
                                      max_len=self.opts["max_len"] + 1, pad_id=PAD, **kw)
        except ValueError as e:  # e.g. a mechanism without the causal form the decoder needs
            hint = ("; or keep it for the encoder and give the decoder a causal one: "
                    "--model-opt decoder_mechanism=sdpa"
                    if "mechanism=" in str(e) and "no causal form" in str(e)
                    and "decoder_mechanism" not in cfg.model_kwargs else "")
            raise ConfigError(f"task {self.name!r}: {e}{hint}") from None

    # ---- evaluation --------------------------------------------------------------------
    def _label(self, dec: str) -> str:
        return "greedy" if dec == "greedy" else f"beam{self.opts['beam_size']}"

    def _decode(self, model, dec: str, b: dict[str, torch.Tensor]) -> list[str]:
        steps = self.opts["max_len"] + 1  # y and its EOS
        if dec == "greedy":
            out = model.greedy_decode(b["src"], steps, BOS, EOS, b["src_padding_mask"])
        else:
            out = model.beam_search(b["src"], steps, BOS, EOS, self.opts["beam_size"],
                                    b["src_padding_mask"], self.opts["length_penalty"])
        texts = []
        for row in out.tolist():
            ids = row[1:]
            ids = ids[:ids.index(EOS)] if EOS in ids else ids
            texts.append(self.tgt_tok.decode(ids))
        return texts

    def evaluate(self, model, split, max_batches=None):
        groups = chunks(range(len(self.pairs[split][0])), 2 * self.config.batch_size)
        groups = groups[:max_batches]
        device = next(model.parameters()).device
        hyps: dict[str, list[str]] = {d: [] for d in self.decodings}
        right = total = 0
        with eval_mode(model):
            for g in groups:
                b = {k: v.to(device) for k, v in self._batch(split, g).items()}
                logits = model(b["src"], b["tgt_in"], b["src_padding_mask"],
                               b["tgt_padding_mask"])
                real = b["tgt_out"] != PAD
                right += int(((logits.argmax(-1) == b["tgt_out"]) & real).sum())
                total += int(real.sum())
                for d in self.decodings:
                    hyps[d] += self._decode(model, d, b)
        n = sum(map(len, groups))
        sources, refs = self.texts[split][0][:n], self.texts[split][1][:n]
        metrics: dict[str, Any] = {"token_accuracy": right / max(1, total)}
        for d in self.decodings:
            scores = text_scores(hyps[d], refs)
            metrics.update({f"{k}_{self._label(d)}": v for k, v in scores.items()})
        metrics.update(text_scores(hyps[self.decodings[-1]], refs))  # beam's, if decoded
        k = self.opts["n_examples"]
        self.save_json(f"examples-{split}.json", [
            {"source": s, "reference": r, **{self._label(d): hyps[d][i] for d in hyps}}
            for i, (s, r) in enumerate(zip(sources[:k], refs[:k], strict=True))])
        return metrics
