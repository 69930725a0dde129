"""Where a run was measured: machine fingerprint, versions, git commit and the fp32 roof."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from attnlab.version import __version__

__all__ = ["describe", "fingerprint", "git_commit", "matmul_roof_gflops", "versions"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def describe(device: str = "cpu") -> dict:
    """CPU model, usable cores, RAM and GPU (name, memory) of this machine."""
    gpu = None
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": _cpu_model(), "cores": cores, "ram_gib": round(_ram_gib(), 1), "gpu": gpu,
            "os": platform.platform()}


def fingerprint(machine: dict, threads: int) -> str:
    """Same hardware and thread count -> same fingerprint (runs on it are comparable)."""
    key = f"{machine['cpu']}|{machine['cores']}|{machine['ram_gib']}|{machine['gpu']}|{threads}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "attnlab": __version__}


def git_commit() -> str | None:
    """The commit of the attnlab checkout in use (``+dirty`` with local changes), if any."""
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty.strip() else "")


def matmul_roof_gflops(threads: int, device: str = "cpu", size: int = 2048,
                       min_run_time: float = 0.5) -> float:
    """Measured fp32 GFLOP/s of a ``size^3`` matmul: what any attention kernel here can
    at best reach (attention is matmul plus softmax)."""
    torch.set_num_threads(threads)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    m = Timer("a @ b", globals={"a": a, "b": b}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time)
    return 2 * size**3 / m.median / 1e9
