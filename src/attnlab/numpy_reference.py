"""Scaled dot-product attention from scratch in NumPy: an executable walk-through.

No torch here: this module is the definition written with nothing but NumPy, kept as
documentation whose examples run (``python -m doctest -v``, and the test suite). The
steps are those of the well-known tutorial, with four three-dimensional "word
embeddings":

>>> import numpy as np
>>> words = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]])

**1. Projections.** Queries, keys and values are linear maps of the same words (here
random integer matrices, to keep the numbers readable):

>>> rng = np.random.RandomState(42)
>>> W_Q, W_K, W_V = (rng.randint(3, size=(3, 3)) for _ in range(3))
>>> Q, K, V = words @ W_Q, words @ W_K, words @ W_V
>>> Q.shape, K.shape, V.shape
((4, 3), (4, 3), (4, 3))

**2. Scores.** Every query meets every key: ``scores[i, j] = Q[i] . K[j]``:

>>> scores = Q @ K.T
>>> scores[0]
array([ 8,  2, 10,  2])

**3. Scaled.** Dividing by ``sqrt(d_k)`` keeps the logits' spread independent of the
head size, so the softmax does not saturate:

>>> scaled = scores / K.shape[1] ** 0.5
>>> bool(np.allclose(scaled[0], [4.61880215, 1.15470054, 5.77350269, 1.15470054]))
True

**4. Softmax.** Each row becomes a probability distribution over the keys:

>>> weights = softmax(scaled, axis=1)
>>> weights.sum(axis=1).round(12).tolist()
[1.0, 1.0, 1.0, 1.0]

**5. Weighted sum.** Each output row mixes the values with those weights:

>>> attention = weights @ V
>>> bool(np.allclose(attention, scaled_dot_product_attention(Q, K, V)))
True

:func:`tutorial_example` reproduces the tutorial exactly (its published first row):

>>> print(tutorial_example()[0].round(8))
[0.98522025 1.74174051 0.75652026]

Masks are boolean, ``True`` = may attend; a row with nothing allowed gives zeros:

>>> causal = np.tril(np.ones((4, 4), dtype=bool))
>>> out = scaled_dot_product_attention(Q, K, V, mask=causal)
>>> bool(np.allclose(out[0], V[0]))  # the first word sees only itself
True
>>> scaled_dot_product_attention(Q, K, V, mask=np.zeros((4, 4), dtype=bool))[0].tolist()
[0.0, 0.0, 0.0]
"""

from __future__ import annotations

import numpy as np

__all__ = ["scaled_dot_product_attention", "softmax", "tutorial_example"]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax: subtract the max before exponentiating.

    >>> softmax(np.array([1000.0, 1000.0])).tolist()
    [0.5, 0.5]
    """
    x = np.asarray(x, dtype=float)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def scaled_dot_product_attention(
    Q: np.ndarray, K: np.ndarray, V: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """``softmax(Q K^T / sqrt(d_k)) V`` over the last two axes (any leading batch axes).

    ``Q``: ``(..., Nq, d_k)``, ``K``: ``(..., Nk, d_k)``, ``V``: ``(..., Nk, d_v)``;
    ``mask`` bool, broadcastable to ``(..., Nq, Nk)``, ``True`` = may attend. A query row
    with no allowed key returns zeros.

    >>> scaled_dot_product_attention(np.eye(2), np.eye(2), np.array([[1.0], [3.0]])).shape
    (2, 1)
    """
    Q, K, V = (np.asarray(a, dtype=float) for a in (Q, K, V))
    scores = Q @ np.swapaxes(K, -1, -2) / np.sqrt(K.shape[-1])
    if mask is None:
        return softmax(scores, axis=-1) @ V
    mask = np.broadcast_to(np.asarray(mask, dtype=bool), scores.shape)
    dead = ~mask.any(axis=-1, keepdims=True)
    scores = np.where(mask, scores, -np.inf)
    scores = np.where(dead, 0.0, scores)  # keep fully masked rows finite ...
    weights = np.where(dead, 0.0, softmax(scores, axis=-1))  # ... then zero them
    return weights @ V


def tutorial_example() -> np.ndarray:
    """The four-word example of the classic tutorial, step for step.

    Like the tutorial it seeds NumPy's global generator (``numpy.random.seed(42)``).

    >>> tutorial_example().round(8)[0].tolist()
    [0.98522025, 1.74174051, 0.75652026]
    """
    words = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    np.random.seed(42)
    W_Q = np.random.randint(3, size=(3, 3))
    W_K = np.random.randint(3, size=(3, 3))
    W_V = np.random.randint(3, size=(3, 3))
    Q = words @ W_Q
    K = words @ W_K
    V = words @ W_V
    scores = Q @ K.T
    weights = softmax(scores / K.shape[1] ** 0.5, axis=1)
    attention = weights @ V
    return attention
