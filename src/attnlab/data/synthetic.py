"""Seeded synthetic tasks in the style of Long Range Arena, generated in memory.

Nothing is downloaded: each generator draws from its own ``numpy.random.Generator`` or
``torch.Generator`` built from ``seed`` (never the global RNG), so the same arguments give
the same data on every machine and a different seed gives different data.

* :func:`listops` -- hierarchical list operations (Nangia & Bowman 2018, "ListOps: A
  Diagnostic Dataset for Latent Tree Learning"), with the grammar of Long Range Arena's
  generator ``lra_benchmarks/data/listops.py`` (Tay et al. 2021).
* :func:`associative_recall` -- multi-query associative recall, MQAR (Arora et al. 2023,
  "Zoology: Measuring and Improving Recall in Efficient Language Models").
* :func:`copy_task` -- copy a sequence after a delimiter (the classic memory task of
  Hochreiter & Schmidhuber 1997; Graves et al. 2014, "Neural Turing Machines").
* :func:`selective_copy` -- selective copying (Gu & Dao 2023, "Mamba", Sec. 3.1 and
  Fig. 2): data tokens scattered among noise tokens, reproduced in order.

Token layouts of the tensor tasks (``vocab`` is always the *total* vocabulary, specials
included, so it is the embedding size a model needs):

* copy / selective copy: ``BLANK = 0`` (noise and answer placeholders), ``DELIM = 1``,
  data tokens ``2 .. vocab-1``.
* associative recall: keys ``0 .. vocab//2 - 1``, values ``vocab//2 .. vocab-1``.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.util.checks import check_int

__all__ = [
    "BLANK",
    "DELIM",
    "LISTOPS_OPERATORS",
    "associative_recall",
    "copy_task",
    "evaluate_listops",
    "listops",
    "selective_copy",
]

BLANK = 0
DELIM = 1
_FIRST_DATA = 2  # first data token of the copy tasks (after BLANK and DELIM)

# LRA's OPERATORS list (FIRST and LAST are defined there but commented out of it).
LISTOPS_OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
_END = "]"
_VALUE_P = 0.25  # LRA: a node is an operator with probability VALUE_P, else a value
_MAX_MISSES = 200_000  # consecutive rejected draws before listops gives up (bounds too tight)





def _apply(op: str, args: list[int]) -> int:
    if not args:
        raise ValueError(f"ListOps operator {op!r} needs at least one argument, got none")
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[MED":
        # LRA: int(np.median(...)); the mean of the two middle values, truncated.
        return int(np.median(args))
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator {op!r}; expected one of {LISTOPS_OPERATORS}")


def evaluate_listops(tokens: list[str] | str) -> int:
    """Value of a ListOps expression, by a stack machine over its tokens.

    ``tokens`` is a list like ``["[MAX", "2", "9", "[MIN", "4", "7", "]", "0", "]"]`` (a
    string is split on whitespace). An operator token opens a frame, a digit is appended to
    the top frame, ``"]"`` closes the top frame and appends its value to the one below.
    Malformed input (unknown token, unbalanced brackets, trailing tokens) raises
    ``ValueError``.
    """
    if isinstance(tokens, str):
        tokens = tokens.split()
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for i, tok in enumerate(tokens):
        if result is not None:
            raise ValueError(f"tokens: trailing token {tok!r} at position {i} after a "
                             "complete expression")
        if tok in LISTOPS_OPERATORS:
            stack.append((tok, []))
        elif tok == _END:
            if not stack:
                raise ValueError(f"tokens: unmatched ']' at position {i}")
            op, args = stack.pop()
            value = _apply(op, args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif len(tok) == 1 and tok.isdigit():
            if stack:
                stack[-1][1].append(int(tok))
            else:
                result = int(tok)  # a bare value is a (trivial) expression
        else:
            raise ValueError(f"tokens: unknown token {tok!r} at position {i}; expected "
                             f"one of {LISTOPS_OPERATORS}, ']' or a digit 0-9")
    if stack:
        raise ValueError(f"tokens: {len(stack)} unclosed operator(s) at the end")
    if result is None:
        raise ValueError("tokens: empty expression")
    return result


class _TooLong(Exception):
    """Raised inside the recursion once a tree is sure to exceed ``max_length``."""


def _draw_tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int,
               out: list[str], max_length: int) -> None:
    """Append one subtree's tokens to ``out``, as LRA's ``generate_tree`` draws it.

    LRA: ``r = random()`` if ``depth < max_depth`` else ``1``; ``r > VALUE_P`` gives a value
    drawn uniformly from 0-9, otherwise an operator drawn uniformly with
    ``randint(2, max_args)`` (inclusive) arguments, each a subtree one level deeper.
    """
    r = rng.random() if depth < max_depth else 1.0
    if r > _VALUE_P:
        out.append(str(int(rng.integers(0, 10))))
    else:
        num_args = int(rng.integers(2, max_args + 1))
        # LRA draws the arguments first and the operator after; keep that order so the
        # stream of draws has the same structure.
        start = len(out)
        out.append("")  # placeholder for the operator
        for _ in range(num_args):
            _draw_tree(rng, depth + 1, max_depth, max_args, out, max_length)
        out[start] = LISTOPS_OPERATORS[int(rng.integers(0, len(LISTOPS_OPERATORS)))]
        out.append(_END)
    if len(out) > max_length:
        # Rejected anyway; stopping early does not change the accepted distribution.
        raise _TooLong


def listops(n: int, *, max_depth: int = 10, max_args: int = 10, max_length: int = 2000,
            min_length: int = 500, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` ListOps examples ``(expression, label)``, e.g. ``("[MAX 2 9 [MIN 4 7 ] 0 ]", 9)``.

    Grammar (Nangia & Bowman 2018, as generated by LRA's ``listops.py``): an expression is
    a value 0-9 or ``[OP e1 ... ek ]`` with ``OP`` in MAX, MIN, MED (median, ``int`` of
    ``np.median``, so an even count gives the truncated mean of the middle two), SM (sum
    mod 10) and ``2 <= k <= max_args``. Each node at depth < ``max_depth`` (the root has
    depth 1) is an operator with probability 0.25, otherwise a value; nodes at
    ``max_depth`` are values. The label is the expression's value (10 classes), computed
    by :func:`evaluate_listops`. Expressions whose token count is outside
    ``[min_length, max_length]`` are redrawn.

    Departures from LRA: the length bounds are inclusive (LRA keeps
    ``min_length < length < max_length``); duplicates are not removed (LRA collects a
    ``set``, which could loop forever for tight bounds); the string carries no ``(``/``)``
    parentheses (LRA writes them and its input pipeline strips them); numpy's Generator
    replaces Python's ``random``, so the examples are not LRA's own files.
    """
    check_int("n", n, low=0)
    check_int("max_depth", max_depth, low=1)
    check_int("max_args", max_args, low=2)
    check_int("min_length", min_length, low=1)
    check_int("max_length", max_length, low=1)
    check_int("seed", seed, low=0)
    if min_length > max_length:
        raise ValueError(f"min_length must be <= max_length, got min_length={min_length} "
                         f"> max_length={max_length}")
    # The largest tree (every node above max_depth an operator with max_args arguments)
    # has T(1) tokens, T(max_depth) = 1, T(d) = 2 + max_args * T(d+1). Refuse a min_length
    # above it: no draw could ever be accepted.
    biggest = 1
    for _ in range(max_depth - 1):
        biggest = 2 + max_args * biggest
        if biggest >= min_length:
            break
    if biggest < min_length:
        raise ValueError(f"min_length={min_length} is longer than any expression with "
                         f"max_depth={max_depth}, max_args={max_args} (at most {biggest} "
                         "tokens)")
    rng = np.random.default_rng(seed)
    examples: list[tuple[str, int]] = []
    misses = 0
    while len(examples) < n:
        tokens: list[str] = []
        try:
            _draw_tree(rng, 1, max_depth, max_args, tokens, max_length)
        except _TooLong:
            tokens = []
        if min_length <= len(tokens) <= max_length:
            examples.append((" ".join(tokens), evaluate_listops(tokens)))
            misses = 0
            continue
        misses += 1
        if misses >= _MAX_MISSES:
            raise RuntimeError(f"listops: {_MAX_MISSES} draws in a row fell outside "
                               f"[min_length={min_length}, max_length={max_length}] with "
                               f"max_depth={max_depth}, max_args={max_args}; widen the bounds")
    return examples


def associative_recall(n: int, *, num_pairs: int = 16, vocab: int = 32, num_queries: int = 1,
                       seed: int = 0, bound: bool = False, length: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology").

    Layout of one row of ``inputs`` (length ``2 * num_pairs + num_queries``)::

        k_1 v_1 k_2 v_2 ... k_P v_P q_1 ... q_Q

    Keys are drawn from ``0 .. vocab//2 - 1``, distinct within a row; values from
    ``vocab//2 .. vocab-1`` (repeats allowed); the queries are ``num_queries`` distinct keys
    of the row, in random order. ``targets[b, j]`` is the value paired with ``q_j``.
    Returns ``(inputs (n, 2P+Q), targets (n, Q))``, both ``int64``.

    Simplification of Zoology's MQAR: queries come as one block after the pairs (Zoology
    spreads them over the rest of the sequence, with power-law gaps) and there is no
    padding.

    ``bound=True`` presents each pair as ONE token, ``K + k * V + (v - K)`` for key ``k``
    and value ``v`` (``K = vocab // 2`` keys, ``V = vocab - K`` values), so a row is
    ``(k_1 v_1) ... (k_P v_P) q_1 ... q_Q`` of length ``P + Q``, and the targets are the
    value tokens ``K + K V + (v - K)``, after every pair token (vocabulary
    ``K + K V + V``). The retrieval is the same (find the pair of the queried key among
    ``P``, read its value), but one attention layer can do it: with separate tokens the
    value sits one position after its key, and reading it takes an induction head (two
    layers, and a long plateau before it forms). A fixed-size state (linear attention)
    still has to hold ``P`` associations, and a window still sees only its neighbours.

    ``length`` (optional) makes the rows that long: the pairs stand at random places (in
    their random order) among filler tokens, one id after the vocabulary above, and the
    queries still close the row. The answer is then up to ``length`` tokens back: the
    long-range form of the task.
    """
    check_int("n", n, low=0)
    check_int("num_pairs", num_pairs, low=1)
    check_int("num_queries", num_queries, low=1)
    check_int("vocab", vocab, low=2)
    check_int("seed", seed, low=0)
    if not isinstance(bound, bool):
        raise TypeError(f"bound must be a bool; got {type(bound).__name__} {bound!r}")
    if num_queries > num_pairs:
        raise ValueError(f"num_queries must be <= num_pairs (queries are distinct keys), got "
                         f"num_queries={num_queries} > num_pairs={num_pairs}")
    half = vocab // 2
    if half < num_pairs:
        raise ValueError(f"vocab must be >= 2 * num_pairs = {2 * num_pairs} (keys are "
                         f"distinct and take vocab//2 tokens), got vocab={vocab}")
    g = torch.Generator().manual_seed(seed)
    # Distinct keys per row: the first num_pairs entries of a random permutation of the keys.
    keys = torch.rand(n, half, generator=g).argsort(dim=1)[:, :num_pairs]
    values = torch.randint(half, vocab, (n, num_pairs), generator=g)
    which = torch.rand(n, num_pairs, generator=g).argsort(dim=1)[:, :num_queries]
    queries = keys.gather(1, which)
    targets = values.gather(1, which)
    if bound:
        n_values = vocab - half
        pairs, width = half + keys * n_values + (values - half), 1
        targets, filler = targets + half * n_values, half + half * n_values + n_values
    else:
        pairs, width, filler = torch.stack([keys, values], dim=2).reshape(n, -1), 2, vocab
    if length is not None:
        check_int("length", length, low=1)
        region = length - num_queries
        if region // width < num_pairs:
            raise ValueError(f"length must leave room for the pairs and queries: at least "
                             f"{width * num_pairs + num_queries}; got length={length}")
        pairs = _spread(pairs, width, region, filler, g)
    return torch.cat([pairs, queries], dim=1), targets


def _spread(pairs: torch.Tensor, width: int, region: int, filler: int,
            g: torch.Generator) -> torch.Tensor:
    """``pairs`` (n, P*width) placed in P random slots of width ``width`` (in order) of a
    row of ``region`` filler tokens."""
    n, p = pairs.shape[0], pairs.shape[1] // width
    slots = torch.rand(n, region // width, generator=g).argsort(dim=1)[:, :p].sort(1).values
    cols = (slots.unsqueeze(-1) * width + torch.arange(width)).reshape(n, -1)
    out = torch.full((n, region), filler, dtype=torch.long)
    return out.scatter_(1, cols, pairs)


def _check_vocab(vocab: int) -> None:
    check_int("vocab", vocab, low=1)
    if vocab < _FIRST_DATA + 1:
        raise ValueError(f"vocab must be >= {_FIRST_DATA + 1} (BLANK={BLANK}, DELIM={DELIM} "
                         f"and at least one data token), got vocab={vocab}")


def copy_task(n: int, *, length: int = 32, vocab: int = 8,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy task: read ``length`` tokens, then reproduce them after a delimiter.

    Layout of one row of ``inputs`` (length ``2 * length + 1``)::

        x_1 ... x_L DELIM BLANK ... BLANK     (L blanks: the positions to answer at)

    with ``x_i`` uniform over the data tokens ``2 .. vocab-1``; ``targets`` is
    ``x_1 ... x_L``, the tokens a model should emit at the ``L`` blank positions. Returns
    ``(inputs (n, 2L+1), targets (n, L))``, both ``int64``.
    """
    check_int("n", n, low=0)
    check_int("length", length, low=1)
    _check_vocab(vocab)
    check_int("seed", seed, low=0)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(_FIRST_DATA, vocab, (n, length), generator=g)
    delim = torch.full((n, 1), DELIM, dtype=torch.long)
    blanks = torch.full((n, length), BLANK, dtype=torch.long)
    return torch.cat([data, delim, blanks], dim=1), data.clone()


def selective_copy(n: int, *, length: int = 64, num_tokens: int = 8, vocab: int = 8,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective copying (Gu & Dao 2023, "Mamba", Sec. 3.1, Fig. 2).

    Layout of one row of ``inputs`` (length ``length + 1 + num_tokens``)::

        [length positions: num_tokens data tokens at random distinct positions, BLANK
         (noise) elsewhere] DELIM BLANK ... BLANK (num_tokens answer placeholders)

    Data tokens are uniform over ``2 .. vocab-1``. ``targets`` holds the data tokens in
    the order they appear, the answer a model should emit at the placeholders. Unlike the
    plain copy task the spacing varies, so a time-invariant convolution cannot solve it.
    Returns ``(inputs (n, length + 1 + num_tokens), targets (n, num_tokens))``, ``int64``.
    """
    check_int("n", n, low=0)
    check_int("length", length, low=1)
    check_int("num_tokens", num_tokens, low=1)
    _check_vocab(vocab)
    check_int("seed", seed, low=0)
    if num_tokens > length:
        raise ValueError(f"num_tokens must be <= length (one token per position), got "
                         f"num_tokens={num_tokens} > length={length}")
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(_FIRST_DATA, vocab, (n, num_tokens), generator=g)
    # Sorted positions keep the data tokens in target order along the sequence.
    positions = torch.rand(n, length, generator=g).argsort(dim=1)[:, :num_tokens]
    positions = positions.sort(dim=1).values
    region = torch.full((n, length), BLANK, dtype=torch.long)
    region.scatter_(1, positions, data)
    delim = torch.full((n, 1), DELIM, dtype=torch.long)
    blanks = torch.full((n, num_tokens), BLANK, dtype=torch.long)
    return torch.cat([region, delim, blanks], dim=1), data
