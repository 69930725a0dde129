"""attnlab: implement, verify, benchmark, train and compare attention mechanisms.

>>> import torch, attnlab
>>> q = k = v = torch.randn(2, 4, 128, 32)
>>> out = attnlab.attention(q, k, v, mechanism="flash", is_causal=True)
>>> "flash" in attnlab.list_mechanisms(exact=True, causal=True)
True
"""

from attnlab import (
    mechanisms,  # noqa: F401  (registers the built-in mechanisms)
    nn,  # noqa: F401  (attnlab.nn.MultiheadAttention)
    tasks,  # noqa: F401  (registers the built-in tasks: attnlab train --task NAME)
    verify,  # the correctness gate: attnlab.verify.verify(name), verify_all()
)
from attnlab.functional import attention, choose_mechanism
from attnlab.mechanisms.base import Mechanism
from attnlab.registry import (
    HParam,
    Limit,
    MechanismSpec,
    Paper,
    create,
    create_for,
    get,
    list_mechanisms,
    register_mechanism,
)
from attnlab.version import __version__

__all__ = [
    "HParam",
    "Limit",
    "Mechanism",
    "MechanismSpec",
    "Paper",
    "attention",
    "choose_mechanism",
    "create",
    "create_for",
    "get",
    "list_mechanisms",
    "register_mechanism",
    "verify",
    "__version__",
]
