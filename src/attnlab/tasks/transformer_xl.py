"""WikiText-2 with Transformer-XL (Dai et al. 2019): segment-level recurrence, trained and
evaluated with the memory carried from segment to segment.

Task ``wikitext2_xl`` is :class:`~attnlab.tasks.language.WikiText2` (same files, tokenizer,
streams; ``max_len`` is the segment length) with model ``"transformer_xl"``
(:class:`~attnlab.models.transformer_xl.TransformerXL`). Options:

* ``attention``: ``"relative"`` (default, the paper's relative positional attention) or
  ``"rope"``: ``--mechanism`` (any registered mechanism with the flags ``arbitrary_mask``
  and ``cross``) with rotary positions. With ``"relative"`` ``--mechanism`` must stay at its
  default ``sdpa`` (it is unused) and ``--mech-opt`` empty.
* ``mem_len``: the training memory (default ``max_len``, one segment).
* ``eval_mem_len``: the memory lengths evaluated (an int, a list, or ``"0,64"``; default
  0, 1, 2 and 4 segments); each gives ``perplexity_mem<M>``, and ``perplexity`` (the
  primary metric), ``loss``, ``word_perplexity`` are those at ``mem_len``.

Training keeps the memory across consecutive batches of an epoch: LMStream's batch ``i+1``
continues batch ``i`` in every one of its ``batch_size`` columns. The memory starts empty at
the epoch's first batch and at the first batch after a resume (it is not checkpointed), so a
resumed run is a finished run with the same number of steps but not bitwise the
uninterrupted one: its first step after the resume saw no memory. Evaluation streams each
split segment by segment with the memory carried, from empty.

:meth:`WikiText2XL.cached_vs_recomputed` times the cached evaluation against recomputing
each segment with its ``mem_len`` previous tokens as one longer causal sequence. The two
perplexities agree exactly for one layer (its memory is the tokens' embeddings) and for the
first segments (no older context yet); with more layers the cached memory of layer ``l``
holds states computed with their own older context, which the recomputation lacks.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as nnf

from attnlab.data.batching import LMStream
from attnlab.models.transformer_xl import TransformerXL
from attnlab.tasks.common import LazyBatches, eval_mode, transformer_kwargs
from attnlab.tasks.language import WikiText2
from attnlab.train.config import ConfigError
from attnlab.train.metrics import perplexity
from attnlab.train.task import register_task

__all__ = ["WikiText2XL", "parse_mem_lens"]

_MODEL_KEYS = ("d_model", "num_heads", "num_layers", "d_ff", "dropout", "rope_base")
ATTENTIONS = ("relative", "rope")


def parse_mem_lens(value, *, where: str) -> list[int]:
    """``eval_mem_len`` as a sorted list of distinct ints >= 0: an int, a list of them, or a
    comma-separated string (``--task-opt eval_mem_len=0,64``)."""
    items = value
    if isinstance(value, str):
        try:
            items = [int(x) for x in value.split(",")]
        except ValueError:
            raise ConfigError(f"{where}: eval_mem_len must be an int >= 0, a list of them or "
                              f"'0,64,...'; got {value!r}") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    ok = isinstance(items, (list, tuple)) and len(items) > 0 and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in items)
    if not ok:
        raise ConfigError(f"{where}: eval_mem_len must be an int >= 0 or a non-empty list of "
                          f"them; got {value!r}")
    return sorted(set(items))


@register_task
class WikiText2XL(WikiText2):
    """WikiText-2 language modelling with Transformer-XL's memory (see the module)."""

    name = "wikitext2_xl"
    summary = "WikiText-2 with Transformer-XL segment recurrence, perplexity per memory length"
    models = ("transformer_xl",)
    options = {**WikiText2.options, "attention": "relative", "mem_len": None,
               "eval_mem_len": None}
    defaults = {**WikiText2.defaults, "model": "transformer_xl"}

    def __init__(self, config, run_dir=None) -> None:
        super().__init__(config, run_dir)
        self._check_options()
        self._train_memory: dict[str, Any] | None = None  # {"index", "mems_in", "mems_out"}

    def _check_options(self) -> None:
        o, where, cfg = self.opts, f"task {self.name!r}", self.config
        seg = o["max_len"]
        if isinstance(seg, bool) or not isinstance(seg, int) or seg < 1:
            raise ConfigError(f"{where}: max_len (the segment length) must be an int >= 1; "
                              f"got {seg!r}")
        mem = seg if o["mem_len"] is None else o["mem_len"]
        if isinstance(mem, bool) or not isinstance(mem, int) or mem < 0:
            raise ConfigError(f"{where}: mem_len must be an int >= 0 or None (= max_len); "
                              f"got {o['mem_len']!r}")
        evals = ([0, seg, 2 * seg, 4 * seg] if o["eval_mem_len"] is None
                 else parse_mem_lens(o["eval_mem_len"], where=where))
        if o["attention"] not in ATTENTIONS:
            raise ConfigError(f"{where}: attention must be one of {list(ATTENTIONS)} "
                              f"('rope': --mechanism with rotary positions); got "
                              f"{o['attention']!r}")
        if o["attention"] == "relative" and (cfg.mechanism != "sdpa" or cfg.mechanism_kwargs):
            raise ConfigError(f"{where}: attention='relative' uses no registered mechanism, "
                              f"but mechanism={cfg.mechanism!r} (mechanism_kwargs "
                              f"{cfg.mechanism_kwargs}) was given; pass --task-opt "
                              f"attention=rope to run it over the memory")
        self.mem_len, self.eval_mem_lens = mem, evals
        self.model_kwargs = transformer_kwargs(cfg.model_kwargs, _MODEL_KEYS, where=where)

    def setup(self) -> None:
        super().setup()
        self._info.update(attention=self.opts["attention"], mem_len=self.mem_len,
                          eval_mem_len=self.eval_mem_lens)
        self.save_json("data.json", self._info)

    def build_model(self):
        cfg, seg = self.config, self.opts["max_len"]
        relative = self.opts["attention"] == "relative"
        # The span covers every evaluated memory and the recomputed evaluation's context.
        span = seg + max(self.mem_len, *self.eval_mem_lens)
        return TransformerXL(self.tokenizer.vocab_size,
                             attention="relative" if relative else cfg.mechanism,
                             mechanism_kwargs=None if relative else cfg.mechanism_kwargs,
                             max_len=span, mem_len=self.mem_len, **self.model_kwargs)

    # ---- training: the memory carried from batch i to batch i + 1 -----------------------
    def train_batches(self, epoch: int):
        stream = self.train_stream

        def make(i: int) -> dict[str, torch.Tensor]:
            x, y = stream.batch(i)
            return {"x": x, "y": y, "index": torch.tensor(i)}

        return LazyBatches(len(stream), make)

    def _memory_for(self, index: int):
        """The memory batch ``index`` continues: the previous batch's states; the same as
        last time when a regime asks for the same batch again; none at an epoch's first
        batch or after a resume (the memory is not checkpointed)."""
        state = self._train_memory
        if state is None or index == 0:
            return None
        if state["index"] == index:
            return state["mems_in"]
        return state["mems_out"] if state["index"] == index - 1 else None

    def loss(self, model, batch):
        index = int(batch["index"])
        mems = self._memory_for(index)
        logits, new = model(batch["x"], mems)
        self._train_memory = {"index": index, "mems_in": mems, "mems_out": new}
        return nnf.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten()), \
            batch["y"].numel()

    # ---- evaluation ---------------------------------------------------------------------
    def _stream(self, split: str) -> LMStream:
        return LMStream(self.streams[split], self.opts["eval_batch_size"], self.opts["max_len"])

    def _metrics(self, split: str, nll: float, tokens: int, whole: bool) -> dict[str, Any]:
        out = {"loss": nll / tokens, "perplexity": float(perplexity(nll, tokens)),
               "tokens": tokens}
        if whole:  # the whole split: the word count is known exactly
            covered = tokens / self.streams[split].numel()
            out["word_perplexity"] = float(perplexity(nll, self.words[split] * covered))
        return out

    def _stream_score(self, model, split: str, max_batches: int | None, forward):
        """Stream ``split`` segment by segment through ``forward(i, x, stream)`` (the
        logits of segment ``i``'s inputs ``x``): its metrics, ``time_s`` the forwards'."""
        stream = self._stream(split)
        n = len(stream) if max_batches is None else min(len(stream), max_batches)
        device = next(model.parameters()).device
        nll, tokens, seconds = 0.0, 0, 0.0
        with eval_mode(model):
            for i in range(n):
                x, y = (t.to(device) for t in stream.batch(i))
                t0 = time.perf_counter()
                logits = forward(i, x, stream)
                seconds += time.perf_counter() - t0
                nll += nnf.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                         reduction="sum").item()
                tokens += y.numel()
        return {**self._metrics(split, nll, tokens, n == len(stream)), "time_s": seconds,
                "segments": n}

    def evaluate_memory(self, model, split: str, mem_len: int,
                        max_batches: int | None = None) -> dict[str, Any]:
        """Perplexity of ``split`` streamed segment by segment, the memory (``mem_len``
        positions per layer) carried from empty; ``time_s`` the forward passes' time."""
        mems = None

        def forward(i, x, stream):
            nonlocal mems
            logits, mems = model(x, mems, mem_len=mem_len)
            return logits

        return self._stream_score(model, split, max_batches, forward)

    def evaluate_recomputed(self, model, split: str, mem_len: int,
                            max_batches: int | None = None) -> dict[str, Any]:
        """As :meth:`evaluate_memory` without a cache: each segment runs with its
        ``mem_len`` previous tokens (fewer at the start) as one causal sequence."""
        def forward(i, x, stream):
            start = i * stream.seq_len
            context = stream.rows[:, max(0, start - mem_len):start + x.shape[1]].to(x.device)
            return model(context, mem_len=0, num_logits=x.shape[1])[0]

        return self._stream_score(model, split, max_batches, forward)

    def cached_vs_recomputed(self, model, split: str = "validation",
                             mem_len: int | None = None,
                             max_batches: int | None = None) -> dict[str, Any]:
        """Both evaluations at ``mem_len`` (default the training one): their perplexities,
        times (s, and ms per segment of ``eval_batch_size`` columns) and the speed-up."""
        mem_len = self.mem_len if mem_len is None else mem_len
        if isinstance(mem_len, bool) or not isinstance(mem_len, int) or mem_len < 0:
            raise ConfigError(f"task {self.name!r}: mem_len must be an int >= 0; "
                              f"got {mem_len!r}")
        cached = self.evaluate_memory(model, split, mem_len, max_batches)
        recomputed = self.evaluate_recomputed(model, split, mem_len, max_batches)
        segs = cached["segments"]
        return {"mem_len": mem_len, "segments": segs,
                "perplexity_cached": cached["perplexity"],
                "perplexity_recomputed": recomputed["perplexity"],
                "time_cached_s": cached["time_s"], "time_recomputed_s": recomputed["time_s"],
                "ms_per_segment_cached": 1e3 * cached["time_s"] / segs,
                "ms_per_segment_recomputed": 1e3 * recomputed["time_s"] / segs,
                "speedup": recomputed["time_s"] / max(cached["time_s"], 1e-12)}

    def evaluate(self, model, split, max_batches=None):
        """One ``perplexity_mem<M>`` per evaluated memory length; the rest at ``mem_len``."""
        out: dict[str, Any] = {}
        for m in sorted({*self.eval_mem_lens, self.mem_len}):
            res = self.evaluate_memory(model, split, m, max_batches)
            out[f"perplexity_mem{m}"] = res["perplexity"]
            if m == self.mem_len:
                out.update({k: v for k, v in res.items() if k not in ("time_s", "segments")})
        return out
