"""Synthetic tasks: determinism, correctness against independent loops, argument errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from attnlab.data import (
    BLANK,
    DELIM,
    associative_recall,
    copy_task,
    evaluate_listops,
    listops,
    selective_copy,
)

SMALL = dict(max_length=80, min_length=20)


def _recursive_value(tokens: list[str]) -> int:
    """A recursive-descent evaluator, independent of the stack machine under test."""
    def parse(i):
        tok = tokens[i]
        if tok.isdigit():
            return int(tok), i + 1
        args, i = [], i + 1
        while tokens[i] != "]":
            v, i = parse(i)
            args.append(v)
        ops = {"[MAX": max, "[MIN": min, "[SM": lambda a: sum(a) % 10,
               "[MED": lambda a: sorted(a)[len(a) // 2] if len(a) % 2
               else (sorted(a)[len(a) // 2 - 1] + sorted(a)[len(a) // 2]) // 2}
        return ops[tok](args), i + 1
    value, end = parse(0)
    assert end == len(tokens)
    return value


@pytest.mark.parametrize("expr, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[SM 5 6 7 ]", 8),
    ("[MED 1 9 3 4 ]", 3),  # middle two 3, 4 -> int(3.5) = 3
    ("[MED 1 9 3 ]", 3),
    ("[MIN 5 [MAX 1 2 ] 8 ]", 2),
    ("[SM [SM 9 9 ] [MED 2 2 8 ] 0 ]", 0),  # (18 % 10 = 8) + 2 + 0 = 10 -> 0
    ("7", 7),
])
def test_evaluator_hand_written(expr, value):
    assert evaluate_listops(expr.split()) == value
    assert evaluate_listops(expr) == value


@pytest.mark.parametrize("expr", ["[MAX 1 2", "[MAX 1 2 ] ]", "[FOO 1 ]", "[MAX 12 ]",
                                  "", "[MAX ]", "3 4"])
def test_evaluator_rejects_malformed(expr):
    with pytest.raises(ValueError, match="tokens|operator"):
        evaluate_listops(expr)


def test_listops_labels_lengths_and_balance():
    examples = listops(300, seed=3, **SMALL)
    assert len(examples) == 300
    for expr, label in examples:
        tokens = expr.split()
        assert 20 <= len(tokens) <= 80
        assert label == evaluate_listops(tokens) == _recursive_value(tokens)
        assert 0 <= label <= 9
        assert tokens[0] in {"[MAX", "[MIN", "[MED", "[SM"}
    counts = Counter(label for _, label in examples)
    assert len(counts) >= 5
    assert max(counts.values()) / len(examples) <= 0.6


def test_listops_respects_depth_and_args():
    for expr, _ in listops(50, max_depth=3, max_args=3, max_length=40, min_length=5, seed=1):
        depth = max_depth = 0
        for tok in expr.split():
            depth += tok.startswith("[")
            depth -= tok == "]"
            max_depth = max(max_depth, depth)
        # Operators sit at depths 1 .. max_depth-1; leaves at max_depth.
        assert max_depth <= 2
        assert len(expr.split()) <= 2 + 3 * (2 + 3)


def test_listops_deterministic_and_seeded():
    a = listops(20, seed=5, **SMALL)
    state = np.random.get_state()
    torch_state = torch.get_rng_state()
    assert listops(20, seed=5, **SMALL) == a
    assert listops(20, seed=6, **SMALL) != a
    # Never touches the global RNGs.
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("fn, kwargs", [
    (associative_recall, dict(num_pairs=8, vocab=20, num_queries=3)),
    (copy_task, dict(length=10, vocab=6)),
    (selective_copy, dict(length=30, num_tokens=5, vocab=6)),
])
def test_tensor_tasks_deterministic_and_seeded(fn, kwargs):
    torch_state = torch.get_rng_state()
    x1, y1 = fn(16, seed=0, **kwargs)
    x2, y2 = fn(16, seed=0, **kwargs)
    x3, y3 = fn(16, seed=1, **kwargs)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.dtype == y1.dtype == torch.long
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_associative_recall_targets():
    P, V, Q = 6, 16, 4
    x, y = associative_recall(64, num_pairs=P, vocab=V, num_queries=Q, seed=2)
    assert x.shape == (64, 2 * P + Q) and y.shape == (64, Q)
    for row, tgt in zip(x.tolist(), y.tolist(), strict=True):
        keys, values = row[0:2 * P:2], row[1:2 * P:2]
        assert len(set(keys)) == P and all(0 <= k < V // 2 for k in keys)
        assert all(V // 2 <= v < V for v in values)
        queries = row[2 * P:]
        assert len(set(queries)) == Q
        for q, t in zip(queries, tgt, strict=True):
            found = [values[i] for i in range(P) if keys[i] == q]
            assert found == [t]


@pytest.mark.parametrize("length", [None, 40])
def test_associative_recall_bound_pairs_are_the_same_recall_in_one_token(length):
    """Each pair is one token K + k V + (v - K); decoding the tokens gives back the plain
    task's pairs, and the target is the queried key's value, as a value token after every
    pair token. With ``length`` the pairs keep their order among filler tokens."""
    P, V, Q = 6, 16, 4
    K, n_values = V // 2, V - V // 2
    plain_x, plain_y = associative_recall(32, num_pairs=P, vocab=V, num_queries=Q, seed=3)
    x, y = associative_recall(32, num_pairs=P, vocab=V, num_queries=Q, seed=3, bound=True,
                              length=length)
    filler = K + K * n_values + n_values
    assert x.shape == (32, length or P + Q) and y.shape == (32, Q)
    for row, tgt, prow, ptgt in zip(x.tolist(), y.tolist(), plain_x.tolist(),
                                    plain_y.tolist(), strict=True):
        pairs = [t for t in row[:-Q] if t != filler]
        assert len(pairs) == P and row[-Q:] == prow[2 * P:]
        decoded = [((t - K) // n_values, K + (t - K) % n_values) for t in pairs]
        assert decoded == list(zip(prow[0:2 * P:2], prow[1:2 * P:2], strict=True))
        assert [t - K * n_values for t in tgt] == ptgt
        assert all(K + K * n_values <= t < filler for t in tgt)


def test_associative_recall_length_must_hold_the_pairs():
    with pytest.raises(ValueError, match=r"length must leave room .* at least 8; got length=7"):
        associative_recall(4, num_pairs=3, vocab=8, num_queries=2, length=7, bound=False)
    associative_recall(4, num_pairs=3, vocab=8, num_queries=2, length=8, bound=False)
    with pytest.raises(TypeError, match="bound must be a bool"):
        associative_recall(4, num_pairs=3, vocab=8, bound="yes")


def test_copy_task_targets():
    L, V = 12, 7
    x, y = copy_task(32, length=L, vocab=V, seed=4)
    assert x.shape == (32, 2 * L + 1) and y.shape == (32, L)
    for row, tgt in zip(x.tolist(), y.tolist(), strict=True):
        d = row.index(DELIM)
        assert d == L
        assert row[:d] == tgt
        assert all(2 <= t < V for t in tgt)
        assert row[d + 1:] == [BLANK] * L


def test_selective_copy_targets():
    L, K, V = 40, 6, 9
    x, y = selective_copy(32, length=L, num_tokens=K, vocab=V, seed=4)
    assert x.shape == (32, L + 1 + K) and y.shape == (32, K)
    for row, tgt in zip(x.tolist(), y.tolist(), strict=True):
        assert row[L] == DELIM and row[L + 1:] == [BLANK] * K
        recovered = [t for t in row[:L] if t != BLANK]
        assert recovered == tgt
        assert all(2 <= t < V for t in tgt)
    # The data tokens really are scattered: positions differ between rows.
    first = (x[:, :L] != BLANK).int().argmax(dim=1)
    assert len(set(first.tolist())) > 1


@pytest.mark.parametrize("fn, kwargs, name", [
    (listops, dict(min_length=50, max_length=40), "min_length"),
    (listops, dict(max_args=1), "max_args"),
    (listops, dict(max_depth=0), "max_depth"),
    (listops, dict(max_depth=2, max_args=3, min_length=10, max_length=20), "min_length"),
    (listops, dict(seed=-1), "seed"),
    (associative_recall, dict(num_pairs=4, num_queries=5), "num_queries"),
    (associative_recall, dict(num_pairs=16, vocab=30), "vocab"),
    (copy_task, dict(vocab=2), "vocab"),
    (copy_task, dict(length=0), "length"),
    (selective_copy, dict(length=4, num_tokens=5), "num_tokens"),
    (selective_copy, dict(vocab=2), "vocab"),
])
def test_bad_arguments_name_the_argument(fn, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fn(4, **kwargs)


@pytest.mark.parametrize("fn", [listops, associative_recall, copy_task, selective_copy])
def test_bad_types(fn):
    with pytest.raises(TypeError, match="n must be an int"):
        fn(2.0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        fn(-1)
