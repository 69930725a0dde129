"""The hashing family: attention that sorts the sequence so that a local pattern (chunks
or blocks of fixed size) reaches the keys that matter, without ``N x N`` scores.

* :mod:`~attnlab.mechanisms.hashing.reformer`: ``reformer``, angular-LSH buckets
  (Kitaev et al. 2020);
* :mod:`~attnlab.mechanisms.hashing.sinkhorn`: ``sinkhorn``, a learned soft block sorting
  made doubly stochastic by Sinkhorn normalisation (Tay et al. 2020).

Importing the package registers both.
"""

from attnlab.mechanisms.hashing.reformer import SELF_SCORE, ReformerAttention, group_size
from attnlab.mechanisms.hashing.sinkhorn import SinkhornAttention

__all__ = ["SELF_SCORE", "ReformerAttention", "SinkhornAttention", "group_size"]
