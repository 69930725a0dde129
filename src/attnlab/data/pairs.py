"""Seeded question/passage pairs for two-sequence models, generated in memory (no download).

:func:`fact_lookup`: the passage is a list of key-value facts, ``k_1 v_1 k_2 v_2 ...
k_P v_P`` (distinct keys); the question is a few keys in random order, exactly one of which
occurs in the passage, the others (distractors) nowhere in it. The answer
(``answer="value"``) is the value of that one key. Both sides must be read together, which
is what co-attention models:

* the question alone says nothing: values are drawn uniformly and independently of it,
  so its accuracy is chance, ``1 / num_values``;
* the passage alone does not say which fact is asked about (one of ``P`` facts): the best
  it can do is the most frequent value among its facts (:func:`passage_only_accuracy`);
* which question key matters is decided only by which one *occurs in the passage*, a
  relation between the two sequences, so a model must attend the question according to
  the passage (the paper's "what words to listen to") and the passage according to the
  question ("where to look").

``answer="key"`` asks for the key itself instead (classes ``num_keys``): which question key
the passage holds. It needs the same matching of the two sides but no binding of a value to
the key before it (a transformer encoder has to learn to read the next position for that;
a BiLSTM has it for free); the question alone then gets ``E[1 / question length]``, the
passage alone ``E[1 / P]``.

Lengths vary per pair (``min_facts .. max_facts`` facts, ``min_question .. max_question``
question keys), so batches carry padding on both sides. Token layout (one vocabulary for
both sides): ``PAD = 0``, keys ``1 .. num_keys``, values ``num_keys + 1 .. num_keys +
num_values``; labels are value indices ``0 .. num_values - 1``. Everything is drawn from
one ``numpy.random.default_rng(seed)`` (never a global RNG), vectorised over the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnlab.util.checks import check_choice, check_int

__all__ = ["ANSWERS", "PAD", "PairData", "fact_lookup", "passage_only_accuracy"]

PAD = 0
ANSWERS = ("value", "key")


@dataclass(frozen=True)
class PairData:
    """``n`` question/passage pairs, right-padded with :data:`PAD` (all ``int64``)."""

    question: torch.Tensor           # (n, max_question)
    passage: torch.Tensor            # (n, 2 * max_facts)
    question_lengths: torch.Tensor   # (n,) real tokens of each question
    passage_lengths: torch.Tensor    # (n,) real tokens of each passage (2 per fact)
    labels: torch.Tensor             # (n,) the answer: value index, or key index (key - 1)
    vocab_size: int                  # token ids used, PAD included
    num_classes: int                 # num_values, or num_keys for answer="key"
    num_keys: int                    # keys are tokens 1 .. num_keys, values after them
    answer: str                      # "value" or "key"

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _check(num_keys, num_values, min_facts, max_facts, min_question, max_question) -> None:
    who = "fact_lookup"
    check_int("num_values", num_values, low=2, who=who)
    check_int("min_facts", min_facts, low=1, who=who)
    check_int("max_facts", max_facts, low=min_facts, who=who)
    check_int("min_question", min_question, low=1, who=who)
    check_int("max_question", max_question, low=min_question, who=who)
    need = max_facts + max_question - 1  # distinct passage keys plus distractors
    check_int("num_keys", num_keys, low=1, who=who)
    if num_keys < need:
        raise ValueError(f"{who}: num_keys must be >= max_facts + max_question - 1 = {need} "
                         f"(passage keys and distractors are distinct); got {num_keys}")


def fact_lookup(n: int, *, num_keys: int = 16, num_values: int = 8, min_facts: int = 2,
                max_facts: int = 6, min_question: int = 1, max_question: int = 4,
                answer: str = "value", seed: int = 0) -> PairData:
    """``n`` pairs of the fact-lookup task (see the module docstring)."""
    check_int("n", n, low=0, who="fact_lookup")
    check_int("seed", seed, low=0, who="fact_lookup")
    check_choice("answer", answer, ANSWERS, who="fact_lookup")
    _check(num_keys, num_values, min_facts, max_facts, min_question, max_question)
    rng = np.random.default_rng(seed)
    P = rng.integers(min_facts, max_facts + 1, n)                  # facts per passage
    L = rng.integers(min_question, max_question + 1, n)            # keys per question
    # Distinct keys per pair: a random permutation's first columns, the passage's keys
    # first (max_facts of them), the distractors after.
    perm = rng.random((n, num_keys)).argsort(axis=1)[:, :max_facts + max_question - 1] + 1
    keys, distractors = perm[:, :max_facts], perm[:, max_facts:]
    values = rng.integers(0, num_values, (n, max_facts))
    asked = (rng.random(n) * P).astype(np.int64)                   # which fact, < P
    slot = (rng.random(n) * L).astype(np.int64)                    # where in the question
    rows = np.arange(n)

    cols = np.arange(2 * max_facts)[None]
    passage = np.stack([keys, values + num_keys + 1], axis=2).reshape(n, 2 * max_facts)
    passage = np.where(cols < 2 * P[:, None], passage, PAD)

    c = np.arange(max_question)[None]
    question = np.zeros((n, max_question), dtype=np.int64)
    if max_question > 1:  # distractors fill the other places, in order, around the slot
        src = np.clip(c - (c > slot[:, None]), 0, max_question - 2)
        question = np.take_along_axis(distractors, src, axis=1)
    question = np.where(c == slot[:, None], keys[rows, asked][:, None], question)
    question = np.where(c < L[:, None], question, PAD)

    def t(x):
        return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.long)

    if answer == "value":
        labels, classes = values[rows, asked], num_values
    else:
        labels, classes = keys[rows, asked] - 1, num_keys
    return PairData(t(question), t(passage), t(L), t(2 * P), t(labels),
                    vocab_size=1 + num_keys + num_values, num_classes=classes,
                    num_keys=num_keys, answer=answer)


def passage_only_accuracy(data: PairData) -> float:
    """The best accuracy on ``data`` (``answer="value"``) of any classifier that reads the
    passage alone: the asked fact is uniform over the ``P`` facts whatever the passage
    holds, so the best guess is its most frequent value, right ``max count / P`` of the
    time. A model above it reads the question too."""
    if data.answer != "value":
        raise ValueError(f"passage_only_accuracy: defined for answer='value' data; got "
                         f"answer={data.answer!r}")
    values = data.passage[:, 1::2] - (data.num_keys + 1)       # value index, or < 0 at PAD
    P = data.passage_lengths // 2
    real = torch.arange(values.shape[1])[None] < P[:, None]
    onehot = torch.zeros(len(data), data.num_classes, dtype=torch.long)
    onehot.scatter_add_(1, values.clamp_min(0), real.long())
    return float((onehot.amax(1) / P).mean())
