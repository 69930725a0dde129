"""Built-in mechanisms. Importing a module registers what it defines.

One module per family, named after it: ``<family>.py``, or a package ``<family>/`` for a
family too large for one file (``hashing``); every mechanism registered with
``family="x"`` is defined in :mod:`attnlab.mechanisms.x` and tested in ``tests/test_x.py``.
Adding a module here (and importing it below) is all it takes for a mechanism to appear in
``attnlab list``. :mod:`attnlab.mechanisms._engines` holds the computational cores that
mechanisms are built on (block-sparse, FlexAttention, flash tiles, causal kernel attention, gated
chunkwise scans, decoding states); it
registers nothing.
"""

from attnlab.mechanisms import (
    adaptive,  # noqa: F401
    axial,  # noqa: F401
    classic,  # noqa: F401
    co_attention,  # noqa: F401
    convolution,  # noqa: F401
    delta,  # noqa: F401
    exact,  # noqa: F401
    fourier,  # noqa: F401
    gated,  # noqa: F401
    gated_linear,  # noqa: F401
    graph,  # noqa: F401
    hashing,  # noqa: F401
    hierarchical,  # noqa: F401
    hybrid,  # noqa: F401
    kernel,  # noqa: F401
    low_rank,  # noqa: F401
    luong,  # noqa: F401
    memory,  # noqa: F401
    ring,  # noqa: F401
    selection,  # noqa: F401
    softmax_variants,  # noqa: F401
    sparse,  # noqa: F401
    synthesizer,  # noqa: F401
)
from attnlab.mechanisms.base import Mechanism

__all__ = ["Mechanism"]
