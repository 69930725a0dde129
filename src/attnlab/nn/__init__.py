"""Layers built on the mechanism registry: multi-head attention, positions, decoding caches.

>>> import torch, attnlab.nn as ann
>>> mha = ann.MultiheadAttention(64, 8, "sdpa", num_kv_heads=2, positions="rope", is_causal=True)
>>> mha(torch.randn(2, 10, 64)).shape
torch.Size([2, 10, 64])
"""

from attnlab.nn.cache import KVCache, StateCache, new_cache
from attnlab.nn.multihead import MultiheadAttention
from attnlab.nn.positional import RotaryEmbedding, alibi_bias, alibi_slopes

__all__ = ["KVCache", "MultiheadAttention", "RotaryEmbedding", "StateCache", "alibi_bias",
           "alibi_slopes", "new_cache"]
