"""Built-in mechanisms. Importing a module registers what it defines.

One file per family; adding a file here (and importing it below) is all it takes
for a mechanism to appear in ``attnlab list``.
"""

from attnlab.mechanisms import (
    adaptive_span,  # noqa: F401
    classic,  # noqa: F401
    exact,  # noqa: F401
    flash,  # noqa: F401
    hashing,  # noqa: F401
    kernel,  # noqa: F401
    lowrank,  # noqa: F401
    sinkhorn,  # noqa: F401
    sparse,  # noqa: F401
    synthesizer,  # noqa: F401
)
from attnlab.mechanisms.base import Mechanism

__all__ = ["Mechanism"]
