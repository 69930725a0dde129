"""Data-parallel training over processes: ``torchrun --nproc-per-node P`` or ``--nproc P``.

Every process (a *rank*) holds the whole model; each global batch ``b`` of
``task.train_batches(epoch)`` is cut row-wise into ``P`` consecutive parts and rank ``r``
trains on part ``r`` (:func:`share`), so over an epoch the ``P`` ranks see every example
once, exactly the examples one process sees at the same ``batch_size`` (what a
``DistributedSampler`` gives, without a second copy of the epoch order). ``batch_size``
must be a multiple of ``P`` (refused otherwise); a shorter last batch of an epoch is cut
into parts that differ by at most one row, and one with fewer rows than ``P`` is refused.

The gradient is the single-process one. A task's loss is a mean over ``n_r`` terms (rows,
tokens that are not padding, masked positions): the global batch's mean is
``L = sum_r (n_r / N) L_r`` with ``N = sum_r n_r``, not the mean of the ``L_r``. Rank ``r``
back-propagates ``(P n_r / N) L_r`` and ``DistributedDataParallel`` averages the gradients
over the ``P`` ranks, which gives ``grad L``. ``n_r`` is :func:`loss_count`: the task's
``loss_count(batch)`` where it defines one, else the batch's rows (right for every loss
that averages the same number of terms per row: classification, fixed-length answers,
language-model windows).

Only rank 0 writes (run directory, checkpoints, metrics, summary, TensorBoard, progress)
and evaluates; the others wait for it in the next collective. Rank 0 sets up the task
first (it may train and save a tokenizer), then the others set theirs up from the files
it wrote, their own writes switched off: a run directory on several machines must be a
shared file system. An error on rank 0 while the others wait (:meth:`Dist.on_main`) is
raised on every rank; a rank that raises or dies elsewhere ends the job through the
launcher (PyTorch's elastic agent stops the other ranks; gloo also fails the peers of a
dead process at once), never a hang. Dropout differs by rank (each rank's generators are
seeded from ``(seed, rank)``) and a checkpoint keeps every rank's generator states, so a
resumed run on ``P`` processes continues with the same masks.

A process group of ``torch.distributed`` (gloo on CPU, nccl on CUDA, ``cuda:LOCAL_RANK``
per process) is opened from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) by :func:`join`, once per process.

Context parallelism (``--context-parallel``: ring attention, ``mechanisms/ring.py``) cuts
each sequence instead of the rows (:mod:`attnlab.train.context`): in its place of
:meth:`Dist.share` (a rank's part of a batch) and :func:`loss_count` (its weight).
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import sys
import threading
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from attnlab.mechanisms.selection import total_reinforce_loss
from attnlab.train.config import ConfigError

__all__ = ["DistEnv", "Dist", "DistributedError", "env", "under_launcher", "join",
           "current", "share", "loss_count", "Objective", "StopFlag", "rank_seed", "launch"]


class DistributedError(ConfigError):
    """A distributed job that cannot run: its environment names the variable, expected and
    given (a user error, as ConfigError: the command exits 2)."""


@dataclass(frozen=True)
class DistEnv:
    """What torchrun (or any launcher) tells a process about its place in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


def _env_int(environ, key: str, low: int, high: int | None = None) -> int:
    text = environ.get(key)
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise DistributedError(f"environment variable {key} must be an integer {bound} "
                               f"(set by torchrun); got {text!r}")
    return value


def env(environ=None) -> DistEnv | None:
    """The launcher's environment, or None where ``WORLD_SIZE`` is not set (one process)."""
    environ = os.environ if environ is None else environ
    if environ.get("WORLD_SIZE") in (None, ""):
        return None
    world = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0, world - 1)
    local = _env_int(environ, "LOCAL_RANK", 0, world - 1) if "LOCAL_RANK" in environ else rank
    port = _env_int(environ, "MASTER_PORT", 1, 65535) if "MASTER_PORT" in environ else None
    return DistEnv(rank, world, local, environ.get("MASTER_ADDR"), port)


def under_launcher(environ=None) -> bool:
    """True in a process that torchrun (or ``attnlab train --nproc``) started."""
    return env(environ) is not None


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s generators: distinct dropout masks on every rank."""
    return seed * 1_000_003 + 7_919 * (rank + 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_global_batch(batch_size: int, world_size: int) -> None:
    """The global ``batch_size`` must be shared by the processes in equal parts."""
    if batch_size % world_size:
        raise ConfigError(f"TrainConfig.batch_size (the global batch) must be a multiple "
                          f"of the {world_size} processes; got {batch_size}")


class Dist:
    """This process's view of the job. With one process every collective is the identity,
    so the training loop has one code path."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def check(self, cfg) -> torch.device:
        """Refuse what this job cannot run (a ``batch_size`` that is not a multiple of the
        processes, a GPU index shared by all of them); this rank's device, where ``cuda``
        means ``cuda:LOCAL_RANK``."""
        device = torch.device(cfg.device)
        if not self.active:
            return device
        if not cfg.context_parallel:  # context parallelism: all rows on every rank
            check_global_batch(cfg.batch_size, self.world_size)
        if device.type != "cuda":
            return device
        if device.index is not None:
            raise ConfigError(f"TrainConfig.device must be 'cuda' (each process takes the "
                              f"GPU of its local rank) in a job of {self.world_size} "
                              f"processes; got {cfg.device!r}")
        device = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(device)
        return device

    def reseed(self, seed: int) -> None:
        """In a job, seed this rank's generators from ``(seed, rank)``: dropout masks of
        its own (one process keeps its generators as they are)."""
        if self.active:
            seed_everything(rank_seed(seed, self.rank))

    def share(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of the global ``batch`` (:func:`share`)."""
        return share(batch, self.rank, self.world_size)

    def _tensor(self, values: list[float]) -> torch.Tensor:
        on = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return torch.tensor(values, dtype=torch.float64, device=on)

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        t = self._tensor(values)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true where it is true on some rank (a SIGTERM seen by one rank stops
        all of them at the same step)."""
        if not self.active:
            return [bool(f) for f in flags]
        t = self._tensor([float(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], Any], *, share: bool = False) -> Any:
        """``fn()`` on rank 0 while the others wait; its result there (and, with ``share``,
        on every rank; else None elsewhere). An exception of ``fn`` is raised on every
        rank, so none waits for a rank 0 that has given up."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # re-raised below, on every rank
                error = e
        sent = (error, result if share else None)
        try:
            sent = self.broadcast(sent)
        except Exception:  # an exception (or result) that does not pickle: its text then
            sent = self.broadcast((DistributedError(f"rank 0 failed: {error!r}")
                                   if error is not None else None, None))
        if error is not None:
            raise error
        if sent[0] is not None:
            raise sent[0]
        return result if self.is_main else sent[1]

    def wrap(self, module: nn.Module) -> nn.Module:
        if not self.active:
            return module
        ids = [self.local_rank] if next(module.parameters()).is_cuda else None
        # find_unused_parameters: a task's model may hold weights a batch does not reach
        # (a pooling it does not use); their gradients stay None on every rank, as in one
        # process.
        return nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                                   find_unused_parameters=True)


def current() -> Dist:
    """The job this process is part of (an initialised process group), else one process."""
    if dist.is_available() and dist.is_initialized():
        e = env()
        local = e.local_rank if e is not None else dist.get_rank()
        return Dist(dist.get_rank(), dist.get_world_size(), local)
    return Dist()


def join(device: str = "cpu") -> Dist:
    """The job this process is part of. Under a launcher (``WORLD_SIZE`` > 1) the first
    call opens the process group from its environment (gloo on CPU, nccl on CUDA) and
    keeps it until the process ends: every run of the process (one per seed) uses the
    same group (closing and opening it again on the launcher's store can hang). A group
    opened by the caller is used as it is; without a launcher: one process."""
    e = env()
    if (dist.is_available() and dist.is_initialized()) or e is None or e.world_size == 1:
        return current()
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(e.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=e.rank, world_size=e.world_size)
    atexit.register(_close)
    return current()


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share(batch: dict[str, torch.Tensor], rank: int, world_size: int
          ) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s rows of the global ``batch``: part ``rank`` of ``world_size``
    consecutive parts (sizes differ by at most one row). Every tensor must have the same
    rows (dim 0)."""
    if world_size == 1:
        return batch
    rows = {k: (v.shape[0] if v.dim() else None) for k, v in batch.items()}
    sizes = set(rows.values())
    if len(sizes) != 1 or None in sizes:
        raise ConfigError(f"data-parallel training splits each batch by rows, so every "
                          f"tensor of a batch needs the same first dimension; got "
                          f"{ {k: tuple(v.shape) for k, v in batch.items()} }")
    n = sizes.pop()
    if n < world_size:
        raise ConfigError(f"a training batch of {n} rows cannot be shared by {world_size} "
                          f"processes (every process needs one row at least): use fewer "
                          f"processes or a larger batch_size")
    return {k: torch.tensor_split(v, world_size)[rank] for k, v in batch.items()}


def loss_count(task, batch: dict[str, torch.Tensor]) -> int:
    """How many terms the task's mean loss over ``batch`` averages (its weight)."""
    count = getattr(task, "loss_count", None)
    if count is not None:
        return int(count(batch))
    return int(next(iter(batch.values())).shape[0])


class Objective(nn.Module):
    """One step's objective as a module, so that ``DistributedDataParallel``'s forward
    covers all a regime does (several forwards, methods of the model other than forward).

    Returns ``(task loss, units, objective)``: the regime's loss plus, for hard attention
    trained by REINFORCE (Xu et al. 2015), its surrogate with the reward minus the loss
    (one for the batch: ``Task.loss`` gives the mean only). The logged loss stays the task's.
    """

    def __init__(self, model: nn.Module, regime) -> None:
        super().__init__()
        self.model = model
        self.regime = regime  # not a module: its teacher (if any) is not trained

    def forward(self, batch: dict[str, torch.Tensor]):
        loss, units = self.regime.loss(self.model, batch)
        surrogate = total_reinforce_loss(self.model, -loss.detach().float())
        objective = loss if surrogate is None else loss + surrogate.to(loss.dtype)
        return loss, units, objective


class StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop at the next step boundary (in a
    job, at the same step on every rank: the loop combines the ranks' flags; torchrun
    passes a Ctrl-C on to every rank as SIGTERM)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop right now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def restore_rng(state: dict, d: Dist, seed: int, set_rng_state: Callable) -> None:
    """Each rank's generator states from a checkpoint; a checkpoint of another number of
    processes resumes with fresh per-rank generators (and says so)."""
    saved = state.get("world_size", 1)
    if saved == d.world_size:
        set_rng_state(state["rng_ranks"][d.rank] if d.active else state["rng"])
        return
    warnings.warn(f"resuming on {d.world_size} process(es) a run checkpointed on {saved}: "
                  f"the weights continue, dropout masks differ from an uninterrupted run",
                  stacklevel=3)
    if d.active:
        seed_everything(rank_seed(seed + int(state["progress"]["step"]), d.rank))
    else:
        set_rng_state(state["rng"])


# ---- the launcher: attnlab train --nproc P -------------------------------------------------
def _failure_line(e) -> str:
    lines = []
    for rank, f in sorted(e.failures.items()):
        msg = f.message if isinstance(f.message, str) else str(f.message)
        how = (f"exited with code {f.exitcode}" if f.exitcode is not None and f.exitcode >= 0
               else f"was killed by signal {-f.exitcode}" if f.exitcode is not None
               else "failed")
        detail = "" if not msg or msg.startswith("To enable traceback") else f": {msg}"
        lines.append(f"rank {rank} {how}{detail}")
    return "; ".join(lines)


def launch(nproc: int, entrypoint: Callable | str, args: tuple = (), *,
           monitor_interval: float = 0.1) -> int:
    """Run ``entrypoint(*args)`` in ``nproc`` processes on this machine, the way torchrun
    ``--standalone`` does (PyTorch's elastic agent, a c10d rendezvous on a free loopback
    port, no restarts): a function (picklable, started by spawn) or a program path.
    Returns 0, or the exit code of the first rank that failed after printing which ranks
    failed and how (their own error lines come before, on their stderr). The agent stops
    the other ranks as soon as one fails."""
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"--nproc must be an int >= 1; got {nproc!r}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=monitor_interval, local_addr="127.0.0.1")
    # as torchrun does: P processes of as many threads as cores would oversubscribe them
    set_threads = nproc > 1 and "OMP_NUM_THREADS" not in os.environ
    if set_threads:
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as e:
        print(f"error: distributed training failed: {_failure_line(e)}", file=sys.stderr)
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c is not None and c > 0), 1)
    finally:
        if set_threads:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0
