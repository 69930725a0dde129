"""Seeded translation-like tasks for sequence-to-sequence models, generated in memory.

Token conventions (``vocab`` is the *total* vocabulary, specials included, so it is the
embedding size a model needs):

* ``PAD = 0`` (batch padding), ``BOS = 1`` (start of target), ``EOS = 2`` (end of target),
  data tokens ``3 .. vocab - 1``.
* A source is data tokens only. A target is ``[BOS] + y + [EOS]`` where ``y`` is the
  source copied, reversed or sorted; a model is trained with ``tgt[:-1]`` as decoder input
  (teacher forcing) and ``tgt[1:]`` as labels, and decodes from ``BOS`` until ``EOS``.

:func:`collate` pads a batch of such pairs into the tensors
:class:`attnlab.models.seq2seq.Seq2SeqTransformer` takes.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.util.checks import check_choice, check_int

__all__ = ["BOS", "EOS", "PAD", "SEQ2SEQ_TASKS", "collate", "pad_sequences", "seq2seq_task"]

PAD, BOS, EOS = 0, 1, 2
FIRST_DATA = 3
SEQ2SEQ_TASKS = ("copy", "reverse", "sort")


def seq2seq_task(n: int, *, task: str = "reverse", min_len: int = 4, max_len: int = 12,
                 vocab: int = 16, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` pairs ``(src, tgt)`` of the ``task`` (``"copy"``, ``"reverse"`` or ``"sort"``,
    ascending), lengths uniform in ``[min_len, max_len]``, data tokens uniform in
    ``3 .. vocab - 1``, drawn from ``numpy.random.default_rng(seed)`` only.

    Returns two lists of ``n`` lists of ints: sources (data tokens) and targets
    ``[BOS] + y + [EOS]`` (see the module docstring).
    """
    n = check_int("n", n, low=0, who="seq2seq_task")
    check_choice("task", task, SEQ2SEQ_TASKS, who="seq2seq_task")
    min_len = check_int("min_len", min_len, low=1, who="seq2seq_task")
    max_len = check_int("max_len", max_len, low=1, who="seq2seq_task")
    if max_len < min_len:
        raise ValueError(f"seq2seq_task: max_len must be >= min_len, got min_len={min_len}, "
                         f"max_len={max_len}")
    vocab = check_int("vocab", vocab, low=FIRST_DATA + 1, who="seq2seq_task")
    seed = check_int("seed", seed, low=0, who="seq2seq_task")
    rng = np.random.default_rng(seed)
    srcs, tgts = [], []
    for length in rng.integers(min_len, max_len + 1, size=n):
        x = rng.integers(FIRST_DATA, vocab, size=int(length)).tolist()
        y = {"copy": x, "reverse": x[::-1], "sort": sorted(x)}[task]
        srcs.append(x)
        tgts.append([BOS, *y, EOS])
    return srcs, tgts


def pad_sequences(seqs: list[list[int]], pad_id: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs`` to ``(ids (B, N) int64, padding_mask (B, N) bool, True = pad)``."""
    if not seqs:
        raise ValueError("pad_sequences: seqs must hold at least one sequence; got none")
    if any(len(s) == 0 for s in seqs):
        raise ValueError("pad_sequences: every sequence needs at least one token; got an "
                         "empty one")
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.ones(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = False
    return ids, mask


def collate(src: list[list[int]], tgt: list[list[int]], pad_id: int = PAD) -> dict:
    """One padded batch: ``src``, ``src_padding_mask``, ``tgt_in`` (targets without their
    last token), ``tgt_out`` (targets without BOS: the labels, ``pad_id`` at padding),
    ``tgt_padding_mask`` (of ``tgt_in``)."""
    if len(src) != len(tgt):
        raise ValueError(f"collate: src and tgt must hold as many sequences; got {len(src)} "
                         f"and {len(tgt)}")
    if any(len(t) < 2 for t in tgt):
        raise ValueError("collate: every target needs at least [BOS, EOS] (2 tokens)")
    s, s_mask = pad_sequences(src, pad_id)
    tgt_in, t_mask = pad_sequences([t[:-1] for t in tgt], pad_id)
    tgt_out, _ = pad_sequences([t[1:] for t in tgt], pad_id)
    return {"src": s, "src_padding_mask": s_mask, "tgt_in": tgt_in, "tgt_out": tgt_out,
            "tgt_padding_mask": t_mask}
