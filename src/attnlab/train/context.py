"""Context-parallel training: ``--context-parallel``, ring attention over the processes.

With ``P`` processes (``torchrun --nproc-per-node P`` or ``attnlab train --nproc P``)
every rank trains on *all* rows of each global batch but only on its shard of every
sequence: ``n = N / P`` tokens, at the global positions ``positions(layout, rank, P, n)``
of the model's ring layers (:mod:`attnlab.mechanisms.ring`; ``layout`` is the mechanism's
hyperparameter, zigzag by default), so a sequence of ``N`` tokens costs each rank ``N / P``
tokens of activations and ``1 / P`` of the attention's work; the key/value shards travel
around the ring. The token embedding adds the global positions, or every layer's RoPE
rotates at them (``DecoderLM(ids, positions=...)``, passed by a forward pre-hook during the
step: the task calls ``model(x)`` itself); every other layer acts on each position alone.

What can run: a task of kind ``language_model`` whose batch is ``{"x", "y"}``, inputs and
targets of the same ``(B, N)`` position by position, and whose loss is the mean over the
targets that are not ``-100`` (``F.cross_entropy``'s ``ignore_index``): WikiText-2. A
classifier pools over the whole sequence, the answer tasks score the last positions only:
refused, as is a model with any layer other than ``ring`` (``--mechanism ring``; for ALiBi
ring's own ``alibi=True`` with ``positions="none"``, the layer's being a dense mask) and a
regime other than the standard one (its extra forwards would not see the positions). RoPE
rotates every shard's queries and keys at their global positions, so ``q_m . k_n`` depends
on ``m - n`` as on one process. The first training batch's ``N`` must cut evenly (``2P``
chunks for zigzag, ``P`` shards otherwise: refused with the ring's message before training
starts). A shorter batch (the end of a WikiText-2 epoch) is padded at its end to the next
multiple, inputs with id 0 and targets with ``-100``: causal attention never lets a real
token see padding after it and the loss ignores it, so the step is exactly the unpadded
one.

The gradient is the single-process one, as in data parallelism
(:mod:`attnlab.train.distributed`): rank ``r``'s loss is the mean over its ``n_r`` real
targets, weighted by ``n_r`` (:meth:`ContextParallel.count`), and
``DistributedDataParallel`` averages the gradients over the job's group (every rank holds
the same weights). The ring's transfers go over a group of their own (the same ranks), so
its point-to-point messages never interleave with DDP's all-reduces.

Evaluation is sharded the same way (:meth:`ContextParallel.evaluate`): every rank scores
its shards of every validation and test batch with ring attention between them, and the
summed negative log-likelihood and target count are all-reduced, so an evaluation
sequence needs no more memory on one process than a training one; rank 0 records the
result (the task gives ``eval_batches`` and ``score``). Outside these forwards every ring
layer points at a one-rank group of its own, made at setup (collectively,
``dist.new_subgroups(1)``), where ring attention is exact attention over the sequence it
is given: a model used by one process alone (generation, ``load_trained``) then works as
usual. Backward uses the group its forward saw.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as nnf

from attnlab.mechanisms._engines.ring import layout_unit
from attnlab.mechanisms.ring import RingAttention, check_length, positions
from attnlab.models.lm import DecoderLM
from attnlab.nn import MultiheadAttention
from attnlab.registry import resolve_name
from attnlab.train.config import ConfigError, TrainConfig
from attnlab.train.distributed import Dist
from attnlab.train.task import eval_mode, get_task

__all__ = ["ContextParallel", "IGNORE", "check_config"]

IGNORE = -100  # F.cross_entropy's ignore_index: padded targets
_GROUPS: dict[int, tuple] = {}  # per world size: (ring group, this rank's one-rank group)


def check_config(cfg: TrainConfig) -> None:
    """Refuse a ``context_parallel`` configuration that cannot run, before any setup."""
    if not cfg.context_parallel:
        return
    try:
        ring = resolve_name(cfg.mechanism) == "ring"
    except (TypeError, ValueError):
        ring = False
    if not ring:
        raise ConfigError(f"--context-parallel shards each sequence over the processes and "
                          f"needs ring attention between them: pass --mechanism ring; got "
                          f"mechanism {cfg.mechanism!r}")
    task = get_task(cfg.task)
    if task.kind != "language_model":
        raise ConfigError(f"--context-parallel trains language models (tasks of kind "
                          f"'language_model', e.g. wikitext2: inputs and targets position "
                          f"by position); task {cfg.task!r} is of kind {task.kind!r}, whose "
                          f"loss needs the whole sequence on one process")
    if cfg.regime != "standard":
        raise ConfigError(f"--context-parallel trains the standard regime only; got regime "
                          f"{cfg.regime!r}")


def _groups(P: int) -> tuple:
    """The ring's group and this rank's one-rank group, made once per process (every rank
    makes them, in the same order: new_group is collective)."""
    if P not in _GROUPS:
        ring = dist.new_group(list(range(P)))
        alone, _ = dist.new_subgroups(group_size=1)
        _GROUPS[P] = (ring, alone)
    return _GROUPS[P]


class ContextParallel:
    """This rank's part of context-parallel training: :meth:`attach` to the model (every
    rank), then per step :meth:`share`, :meth:`count` and ``with`` :meth:`forward`."""

    def __init__(self, cfg: TrainConfig, d: Dist) -> None:
        check_config(cfg)
        self.cfg, self.rank, self.P = cfg, d.rank, d.world_size
        self.layers: list[RingAttention] = []
        self.layout, self.length, self.at = "zigzag", None, None
        self.ring = self.alone = None

    def attach(self, model, task) -> ContextParallel:
        """Check the model and the task's batches, make the groups (collective) and point
        the ring layers at this rank's own group."""
        who = "--context-parallel"
        if not isinstance(model, DecoderLM):
            raise ConfigError(f"{who} trains a DecoderLM; task {task.name!r} builds a "
                              f"{type(model).__name__}")
        attns = [m.attn for m in model.modules() if isinstance(m, MultiheadAttention)]
        others = sorted({a.spec.name for a in attns if not isinstance(a, RingAttention)})
        if others:
            raise ConfigError(f"{who}: every attention layer must be ring (pass --mechanism "
                              f"ring, no other layer_mechanisms); the model has {others}")
        layouts = {a.hp["layout"] for a in attns}
        if len(layouts) != 1:
            raise ConfigError(f"{who}: the ring layers must share one layout; got {layouts}")
        missing = [m for m in ("eval_batches", "score") if not hasattr(task, m)]
        if missing:
            raise ConfigError(f"{who} evaluates shard by shard: task {task.name!r} must give "
                              f"{missing} (as wikitext2 does)")
        self.layers, self.layout = attns, layouts.pop()
        self.length = self._first_length(task)
        if self.P > 1:
            self.ring, self.alone = _groups(self.P)
        self._point(self.alone)
        return self

    def _first_length(self, task) -> int:
        batch = task.train_batches(0)[0]
        x, y = batch.get("x"), batch.get("y")
        if set(batch) != {"x", "y"} or x.dim() != 2 or x.shape != y.shape:
            got = {k: tuple(v.shape) for k, v in batch.items()}
            raise ConfigError(f"--context-parallel needs batches of inputs and targets "
                              f"position by position, x and y of the same (B, N); task "
                              f"{task.name!r} gives {got}")
        try:
            check_length(x.shape[1], self.layout, self.P, who="--context-parallel")
        except ValueError as e:
            raise ConfigError(f"{e}; the training sequences are the task's max_len: choose "
                              f"--task-opt max_len=<a multiple>") from None
        return x.shape[1]

    def _point(self, group) -> None:
        for a in self.layers:
            a.process_group = group

    def share(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's shard of every row of ``batch`` (a shorter batch padded first)."""
        if self.P == 1:
            return batch
        x, y = batch["x"], batch["y"]
        N = x.shape[1]
        if N > self.length:
            raise ConfigError(f"--context-parallel: a training batch of {N} tokens per row "
                              f"is longer than the first ({self.length})")
        pad = -N % layout_unit(self.layout, self.P)
        if pad:  # after every real token: causal attention never sees it, the loss ignores it
            x = torch.cat([x, x.new_zeros(x.shape[0], pad)], 1)
            y = torch.cat([y, y.new_full((y.shape[0], pad), IGNORE)], 1)
            if any(not bool((positions(self.layout, r, self.P, x.shape[1] // self.P) < N)
                            .any()) for r in range(self.P)):
                raise ConfigError(f"--context-parallel: a batch of {N} tokens per row "
                                  f"leaves a process without a token; use fewer processes")
        n = x.shape[1] // self.P
        self.at = positions(self.layout, self.rank, self.P, n, x.device)
        return {"x": x.index_select(1, self.at), "y": y.index_select(1, self.at)}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """The real targets of this rank's shard: the weight of its mean loss."""
        return int((batch["y"] != IGNORE).sum())

    def evaluate(self, model, task, split: str, max_batches: int | None = None) -> dict:
        """The task's metrics on ``split``, every rank on its shards of every batch (as in
        training: ``N / P`` tokens each, ring attention between them), the summed
        negative log-likelihood and target count all-reduced: every rank gets them. Run by
        every rank at once; ``model`` in eval mode, no gradients."""
        device = next(model.parameters()).device
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # nll, targets
        batches, whole = task.eval_batches(split, max_batches)
        with eval_mode(model):
            for x, y in batches:
                shard = {k: t.to(device) for k, t in self.share({"x": x, "y": y}).items()}
                with self.forward(model):
                    logits = model(shard["x"]).float()
                sums[0] += nnf.cross_entropy(logits.flatten(0, 1), shard["y"].flatten(),
                                             ignore_index=IGNORE, reduction="sum")
                sums[1] += self.count(shard)
        if self.P > 1:
            dist.all_reduce(sums, group=self.ring)
        return task.score(split, float(sums[0]), int(sums[1]), whole)

    @contextlib.contextmanager
    def forward(self, model):
        """The step's forward: ring layers over the job, the shard's positions to the
        model; afterwards the layers are this rank's alone again."""
        if self.P == 1:
            yield
            return
        at = self.at.to(next(model.parameters()).device)

        def hook(module, args, kwargs):
            return args, {**kwargs, "positions": at}

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        self._point(self.ring)
        try:
            yield
        finally:
            handle.remove()
            self._point(self.alone)
