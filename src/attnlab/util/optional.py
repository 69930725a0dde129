"""Optional third-party packages, imported where they are used and named the same way
when absent: what needs the package, the package, and the extra of pyproject.toml that
installs it. ``tests/test_extras.py`` checks that each extra named here declares it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["matplotlib_agg", "optional_import"]


def optional_import(module: str, *, extra: str, purpose: str, dist: str | None = None,
                    error: type[Exception] = ImportError) -> ModuleType:
    """``importlib.import_module(module)``; where it is not installed, ``error`` says that
    ``purpose`` needs distribution ``dist`` (default: the module's top-level name) and how
    to install it: ``pip install -e ".[extra]"``, or the distribution alone."""
    try:
        # The top-level package first, as ``import a.b`` does: a submodule already imported
        # must not hide that its package is now unavailable.
        importlib.import_module(module.split(".")[0])
        return importlib.import_module(module)
    except ImportError as e:
        d = dist or module.split(".")[0]
        raise error(f"{purpose} needs `{d}`, which is not installed ({e}); install it with "
                    f'pip install -e ".[{extra}]" (or pip install {d})') from e


def matplotlib_agg(purpose: str):
    """``(matplotlib, Figure, FigureCanvasAgg)`` of the optional matplotlib (the ``viz``
    extra). Figures are made as ``Figure`` objects on an Agg canvas, never through pyplot:
    a caller's pyplot state and backend (a notebook's) are left alone."""
    matplotlib = optional_import("matplotlib", extra="viz", purpose=purpose)
    agg = importlib.import_module("matplotlib.backends.backend_agg")
    figure = importlib.import_module("matplotlib.figure")
    return matplotlib, figure.Figure, agg.FigureCanvasAgg
