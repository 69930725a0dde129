"""Checkpoints that resume a run exactly and load without unpickling arbitrary objects.

A checkpoint holds everything the next step depends on: model, optimizer and scheduler
state, every random number generator the step may draw from (torch CPU and CUDA, Python's
``random``, NumPy's global generator) and the data position ``(epoch, batch in epoch)``.
The training loop cuts batches as a pure function of ``(seed, epoch)``, so a run stopped at
step ``s`` and resumed continues with the same batches, the same dropout masks and ends with
the same weights as a run that never stopped (tested bit for bit).

Files are written to a temporary name and renamed, so a run killed while saving keeps its
previous checkpoint. They load with ``torch.load(weights_only=True)``: tensors, numbers,
strings, lists and dicts only, never code (NumPy and Python RNG states are stored as
tensors and lists for that reason).
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab.files import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint", "check_checkpoint_file", "rng_state",
           "set_rng_state", "CheckpointError", "FORMAT"]

FORMAT = 1
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive; its index is at the very end


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, corrupt, other format, other run)."""


def rng_state() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format number) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Readers see the old file or the new one; a full disk leaves no half checkpoint either.
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def check_checkpoint_file(path: str | Path) -> Path:
    """``path`` is a whole checkpoint file as far as can be seen without loading it: not
    missing, not empty, not a zip archive cut short. Cheap: it reads the first and the
    last bytes only, so a report can check every run before drawing anything."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    # A zip archive without its end (central directory) is what a copy or a disk that
    # filled up mid-write leaves; torch would say only "failed finding central directory".
    if size == 0 or (head == _ZIP_MAGIC and not zipfile.is_zipfile(path)):
        raise CheckpointError(f"checkpoint {path} is empty or truncated ({size} bytes): it "
                              f"was cut short while being written or copied; restore it, or "
                              f"delete it and train again")
    return path


def load_checkpoint(path: str | Path, *, map_location="cpu") -> dict[str, Any]:
    path = check_checkpoint_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file or one holding objects weights_only refuses
        # Some errors (EOFError of a cut pickle) have no message at all.
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "no message")
        raise CheckpointError(f"cannot load checkpoint {path} with weights_only=True: "
                              f"{type(e).__name__}: {first}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has format {found!r}; this attnlab reads "
                              f"format {FORMAT}")
    return state
