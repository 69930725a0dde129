"""Deterministic splits, a manifest of what a run used, and removal of train/test leaks.

All randomness comes from ``numpy.random.default_rng(seed)``, never a global RNG, so a
split depends only on its arguments. Split sizes use largest-remainder rounding: the
sizes add up to ``n`` exactly and each differs from ``n * fraction`` by less than one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["drop_leaks", "random_split", "split_manifest", "split_sizes", "stratified_split"]


def _check_fractions(fractions: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    if not isinstance(fractions, Mapping) or not fractions:
        raise TypeError(f"fractions must be a non-empty dict of split name -> fraction, "
                        f"got {fractions!r}")
    names = list(fractions)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"fractions: split names must be non-empty strings, got {name!r}")
    values = []
    for name, f in fractions.items():
        if isinstance(f, bool) or not isinstance(f, (int, float, np.floating, np.integer)):
            raise TypeError(f"fractions[{name!r}] must be a number, got {type(f).__name__}")
        if not math.isfinite(f) or f <= 0:
            raise ValueError(f"fractions[{name!r}] must be a finite number > 0, got {f}")
        values.append(float(f))
    total = math.fsum(values)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {total:.9g} from {dict(fractions)}")
    return names, np.asarray(values) / total


def _largest_remainder(n: int, fracs: np.ndarray) -> np.ndarray:
    """Integer sizes summing to ``n``: floors of ``n * f``, the remainder to the largest
    fractional parts (ties to the earlier split)."""
    exact = n * fracs
    sizes = np.floor(exact).astype(np.int64)
    rest = n - int(sizes.sum())
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[:rest]] += 1
    return sizes


def split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """The size of each split of ``n`` items, as :func:`random_split` cuts them."""
    names, fracs = _check_fractions(fractions)
    return dict(zip(names, (int(s) for s in _largest_remainder(n, fracs)), strict=True))


def _path(cells, lo, hi, src: int, short: np.ndarray) -> list[tuple[int, int, int]] | None:
    """Moves ``(class, from split, to split)`` that carry one item from split ``src`` to a
    split that is short, each keeping its two cells within their floor/ceil bounds
    (breadth-first search over splits: an augmenting path of the bounded transportation
    problem)."""
    prev: dict[int, tuple[int, int] | None] = {src: None}
    queue = [src]
    while queue:
        j = queue.pop(0)
        for m in range(cells.shape[1]):
            if m in prev:
                continue
            ks = np.flatnonzero((cells[:, j] > lo[:, j]) & (cells[:, m] < hi[:, m]))
            if ks.size == 0:
                continue
            prev[m] = (j, int(ks[0]))
            if short[m]:
                moves = []
                while prev[m] is not None:
                    j, k = prev[m]
                    moves.append((k, j, m))
                    m = j
                return moves
            queue.append(m)
    return None


def _allocate(class_counts: np.ndarray, fracs: np.ndarray) -> np.ndarray:
    """Counts per (class, split) with every row summing to its class count and every
    column to the largest-remainder size of its split (the whole set's).

    Start from each class split by largest remainder (rows exact, each cell the floor or
    ceiling of ``count * fraction``), then move single items between splits until the
    column totals are right: along a path whose moves keep every cell at its floor or
    ceiling when one exists (controlled rounding), else the cheapest single move, which
    can leave a cell one beyond its ceiling or floor (rare, tiny classes).
    """
    totals = _largest_remainder(int(class_counts.sum()), fracs)
    ideal = class_counts[:, None] * fracs[None, :]
    lo, hi = np.floor(ideal), np.ceil(ideal)
    cells = np.stack([_largest_remainder(int(c), fracs) for c in class_counts])
    while True:
        excess = cells.sum(axis=0) - totals
        if not excess.any():
            return cells
        over = int(np.argmax(excess))
        moves = _path(cells, lo, hi, over, excess < 0)
        if moves is None:
            under = int(np.argmin(excess))
            score = (cells[:, over] - ideal[:, over]) - (cells[:, under] - ideal[:, under])
            moves = [(int(np.argmax(np.where(cells[:, over] > 0, score, -np.inf))), over,
                      under)]
        for k, j, m in moves:
            cells[k, j] -= 1
            cells[k, m] += 1


def stratified_split(labels: Sequence | np.ndarray, fractions: Mapping[str, float],
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of each split, stratified by label: ``{name: sorted int64 indices}``.

    Each class is shuffled with ``default_rng(seed)`` (classes in sorted order) and cut
    into consecutive pieces, so every index is used exactly once; per-class sizes are
    ``≈ count * fraction`` and the split totals are the largest-remainder sizes of ``n``
    (see :func:`split_sizes`). Indices come back sorted, keeping the source order.
    """
    names, fracs = _check_fractions(fractions)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    if labels.size == 0:
        return {name: np.zeros(0, dtype=np.int64) for name in names}
    classes, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    cells = _allocate(np.bincount(inverse, minlength=len(classes)), fracs)
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for k in range(len(classes)):
        members = rng.permutation(np.flatnonzero(inverse == k))
        cuts = np.cumsum(cells[k])[:-1]
        for j, piece in enumerate(np.split(members, cuts)):
            parts[j].append(piece)
    return {name: np.sort(np.concatenate(p)).astype(np.int64)
            for name, p in zip(names, parts, strict=True)}


def random_split(n: int, fractions: Mapping[str, float], seed: int = 0) -> dict[str, np.ndarray]:
    """Indices ``0..n-1`` cut into seeded random splits of the sizes :func:`split_sizes`
    gives; ``{name: sorted int64 indices}``, disjoint and complete."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    names, fracs = _check_fractions(fractions)
    perm = np.random.default_rng(seed).permutation(int(n))
    cuts = np.cumsum(_largest_remainder(int(n), fracs))[:-1]
    return {name: np.sort(piece).astype(np.int64)
            for name, piece in zip(names, np.split(perm, cuts), strict=True)}


def _hash_texts(texts: Sequence[str]) -> str:
    # Length-prefixed UTF-8, so ["ab", "c"] and ["a", "bc"] hash differently.
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def split_manifest(splits: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """``{split: {"count", "sha256", "sha256_sorted"}}``, JSON-serialisable.

    ``sha256`` covers the texts in order (the exact data a run used), ``sha256_sorted``
    the sorted texts (the same data in another order still matches).
    """
    out = {}
    for name, texts in splits.items():
        texts = list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"split_manifest: split {name!r} must hold strings, got "
                            f"{type(bad).__name__}")
        out[str(name)] = {"count": len(texts), "sha256": _hash_texts(texts),
                          "sha256_sorted": _hash_texts(sorted(texts))}
    return out


def drop_leaks(train_texts: Sequence[str], train_labels: Sequence | None,
               *held_out: Sequence[str]) -> tuple[list[str], list | None, int]:
    """Remove from train every text that also appears in a held-out split.

    Texts are compared after ``strip()`` (the sources differ in stray spaces). Returns
    ``(texts, labels, n_dropped)``; callers report ``n_dropped`` -- nothing is dropped
    silently. ``train_labels`` may be ``None`` (unlabelled text).
    """
    if train_labels is not None and len(train_labels) != len(train_texts):
        raise ValueError(f"train_labels must have one label per text: {len(train_labels)} "
                         f"labels for {len(train_texts)} texts")
    seen = {t.strip() for split in held_out for t in split}
    keep = [i for i, t in enumerate(train_texts) if t.strip() not in seen]
    texts = [train_texts[i] for i in keep]
    labels = None if train_labels is None else [train_labels[i] for i in keep]
    return texts, labels, len(train_texts) - len(keep)
