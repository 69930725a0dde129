"""flash-linear-attention's own reference implementations, as a peer to check against.

The ``fla-core`` package (extra ``fla``; also in ``peers``) is the reference implementation
of the gated linear-attention field (RetNet, GLA, DeltaNet, Mamba-2's scalar-gated form).
Its kernels are Triton (GPU only), but each op ships a ``naive.py`` in plain PyTorch that
runs on any device. ``import fla`` imports Triton, so those files are loaded here by path,
from where the package is installed, without running its ``__init__``.

    from attnlab.bench.fla_reference import load
    naive = load("gla")                 # the module fla/ops/gla/naive.py
    o, _ = naive.naive_recurrent_gla(q, k, v, gk)

:func:`available` says whether the package is installed; the tests skip without it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["NAIVE", "available", "load", "triton_available"]

# op -> its reference file under fla/ops (each imports only torch and einops)
NAIVE = {
    "retention": "retention/naive.py",      # naive_retention(q, k, v): RetNet, decay per head
    "gla": "gla/naive.py",                  # naive_recurrent_gla(q, k, v, gk): per-dim gates
    "simple_gla": "simple_gla/naive.py",    # scalar gate per head and step (Mamba-2 / SSD)
    "delta_rule": "delta_rule/naive.py",    # delta_rule_recurrence / _chunkwise(q, k, v, beta)
}


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("fla")  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def available() -> bool:
    """Whether ``fla-core`` is installed (its naive paths need only torch and einops)."""
    return _package_dir() is not None and importlib.util.find_spec("einops") is not None


def triton_available() -> bool:
    """Whether fla's Triton kernels can run here: Triton installed and a CUDA device."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def load(op: str) -> ModuleType:
    """The module ``fla/ops/<op>/naive.py`` of the installed ``fla-core``."""
    if op not in NAIVE:
        raise ValueError(f"fla reference: unknown op {op!r}; known: {sorted(NAIVE)}")
    root = _package_dir()
    if root is None:
        raise ImportError("fla reference: the fla-core package is not installed "
                          "(pip install 'attnlab[fla]')")
    name = f"attnlab_fla_naive_{op}"
    if name in sys.modules:
        return sys.modules[name]
    path = root / "ops" / NAIVE[op]
    if not path.is_file():
        raise ImportError(f"fla reference: {path} is missing (fla-core changed its layout?)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
