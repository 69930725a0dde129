"""One training loop for every task: ``train(config, run_dir)``.

The run directory holds ``config.json``, the task's ``data.json`` and tokenizer,
``checkpoint.pt`` (the latest state, every ``checkpoint_every`` steps, at each evaluation
and on SIGINT/SIGTERM), ``best.pt`` (weights of the best validation score), ``metrics.jsonl``
(one row per evaluation) and, at the end, ``summary.json`` with the test metrics of the best
weights. ``train(..., resume=True)`` continues from ``checkpoint.pt`` and ends with the same
weights as a run that was never interrupted.

Under torchrun (or ``attnlab train --nproc P``) the same loop trains data-parallel, only
rank 0 writing and evaluating (:mod:`attnlab.train.distributed`); checkpoints hold the
unwrapped model, and every rank resumes from the file rank 0 wrote. With
``context_parallel`` each rank trains its shard of every sequence (:mod:`attnlab.train.context`).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from attnlab.files import read_json, write_json, write_text_atomic
from attnlab.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from attnlab.train.config import ConfigError, TrainConfig, read_run_config
from attnlab.train.context import ContextParallel
from attnlab.train.distributed import (
    Dist,
    Objective,
    StopFlag,
    join,
    loss_count,
    restore_rng,
    seed_everything,
)
from attnlab.train.metrics import convergence
from attnlab.train.optim import build_optimizer, lr_factor
from attnlab.train.progress import TrainProgress
from attnlab.train.regimes import Regime, get_regime, init_weights
from attnlab.train.task import Task, get_task

__all__ = ["train", "RunResult", "load_trained"]


@dataclass
class RunResult:
    run_dir: Path
    status: str                  # done | early_stopped | time_budget | interrupted
    step: int
    best: dict[str, Any]         # best validation metrics, with their step
    test: dict[str, Any] | None  # test metrics of the best weights (None if interrupted)
    summary: dict[str, Any] = field(default_factory=dict)


class NoTensorBoardWarning(UserWarning):
    """Training writes no TensorBoard event files: the ``tensorboard`` package is missing."""


_TB_SAID: list[str] = []  # the missing-tensorboard warning, once per process


def _tensorboard(run_dir: Path):
    """A SummaryWriter for ``run_dir/tb``, or None where the optional ``tensorboard``
    package (the ``viz`` extra) is not installed: training then runs all the same, and a
    :class:`NoTensorBoardWarning` says so, once per process."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        if not _TB_SAID:
            _TB_SAID.append(str(e))
            warnings.warn(f"training writes no TensorBoard event files ({e}); install them "
                          f"with pip install -e \".[viz]\" (or pip install tensorboard)",
                          NoTensorBoardWarning, stacklevel=2)
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))


def _prepare_dir(cfg: TrainConfig, run_dir: Path, resume: bool) -> dict[str, Any] | None:
    ckpt = run_dir / "checkpoint.pt"
    saved = run_dir / "config.json"
    if resume:
        if not ckpt.exists():
            raise CheckpointError(f"--resume: no checkpoint.pt in {run_dir}; start the run "
                                  f"without --resume")
        old = {"context_parallel": False, **read_json(saved, "run config")}  # older runs
        new = cfg.to_dict()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise ConfigError(f"--resume: the configuration differs from the run's "
                              f"config.json ({detail}); a resumed run must be the same run")
        return load_checkpoint(ckpt)
    if ckpt.exists() or (run_dir / "summary.json").exists():
        raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume to "
                          f"continue it or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, cfg.to_json())
    return None


class _Run:
    """One training run in progress: the task, model, optimiser and the counters that a
    checkpoint saves (``p``) and that a resume restores; ``dist`` is this rank's place in
    a data-parallel job (one process: a job of one)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, state: dict | None,
                 console: Console, dist: Dist) -> None:
        self.cfg, self.run_dir, self.console, self.dist = cfg, run_dir, console, dist
        self.device = dist.check(cfg)
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.task: Task = get_task(cfg.task)(cfg, run_dir)
        if not dist.is_main:  # rank 0 wrote the task's files already
            self.task.save_json = lambda *args, **kwargs: None
        self.task.setup()
        self.model = self.task.build_model()
        # Pre-trained weights start a fresh run only: a resumed one restores its own below.
        self.init_info = (init_weights(self.model, cfg.init_from)
                          if cfg.init_from and state is None else None)
        self.model.to(self.device)
        self.regime: Regime = get_regime(cfg.regime)(cfg, self.task, run_dir)
        self.regime.setup(self.model, self.device)
        self.opt = build_optimizer(self.model, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        self.use_scaler = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.p: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "train_time_s": 0.0,
                                  "best": None, "best_step": None, "bad_evals": 0,
                                  "units": 0, "loss_sum": 0.0, "loss_n": 0}
        self.history: list[dict[str, Any]] = []
        self.context: ContextParallel | None = None  # attached in train(), on every rank
        dist.reseed(cfg.seed)  # dropout masks of its own on each rank
        if state is not None:
            self._restore(state)
        # wrapped by DistributedDataParallel in train(), once every rank has built its own
        self.objective: torch.nn.Module = Objective(self.model, self.regime)
        self.writer = _tensorboard(run_dir) if dist.is_main else None
        self.model_info = {"model": cfg.model, "mechanism": cfg.mechanism,
                           "parameters": sum(x.numel() for x in self.model.parameters()),
                           **self.regime.info()}
        if self.init_info is not None and dist.is_main:
            self.task.save_json("init_from.json", self.init_info)
            self.model_info["init_from"] = cfg.init_from

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.use_scaler:
            self.scaler.load_state_dict(state["scaler"])
        self.p.update(state["progress"])
        self.history = list(state["history"])
        restore_rng(state, self.dist, self.cfg.seed, set_rng_state)

    def checkpoint(self) -> None:
        """Rank 0 writes it, with every rank's generator states (a collective)."""
        d = self.dist
        ranks = {"rng_ranks": d.gather(rng_state()), "world_size": d.world_size} \
            if d.active else {}
        if not d.is_main:
            return
        save_checkpoint(self.run_dir / "checkpoint.pt", {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
            "progress": dict(self.p), "history": self.history, "rng": rng_state(),
            "config": self.cfg.to_dict(), **ranks})

    @property
    def sharded(self) -> bool:
        """Context parallelism over several processes: every rank evaluates its shards."""
        return self.context is not None and self.context.P > 1

    def sharded_metrics(self, split: str, max_batches: int | None = None) -> dict | None:
        """When :attr:`sharded`, ``split``'s metrics with every rank scoring its shards
        (collective: every rank calls it); else None (rank 0 evaluates alone)."""
        if not self.sharded:
            return None
        return self.context.evaluate(self.model, self.task, split, max_batches)

    def evaluate(self, metrics: dict | None = None) -> None:
        """Record an evaluation on the validation split (rank 0): ``metrics`` as the shards
        summed them, or evaluated here."""
        p, task = self.p, self.task
        if metrics is None:
            metrics = evaluate_all(task, self.regime, self.model, "validation",
                                   self.cfg.eval_batches)
        row = {"step": p["step"], "epoch": p["epoch"], "time_s": round(p["train_time_s"], 3),
               "lr": self.sched.get_last_lr()[0],
               "train_loss": p["loss_sum"] / max(1, p["loss_n"]),
               "throughput": p["units"] / max(1e-9, p["train_time_s"]),
               **{f"val_{k}": v for k, v in metrics.items() if _scalar(v)}}
        p["loss_sum"], p["loss_n"] = 0.0, 0
        self.history.append(row)
        value = metrics[task.metric]
        if task.better(value, p["best"]):
            p["best"], p["best_step"], p["bad_evals"] = value, p["step"], 0
            save_checkpoint(self.run_dir / "best.pt", {"model": self.model.state_dict(),
                                                       "step": p["step"], "metrics": metrics})
        else:
            p["bad_evals"] += 1
        # rewritten whole (atomically): a resume never duplicates a row, a kill never
        # leaves half of one
        write_text_atomic(self.run_dir / "metrics.jsonl",
                          "".join(json.dumps(r) + "\n" for r in self.history))
        if self.writer is not None:
            for k, v in row.items():
                if k != "step":
                    self.writer.add_scalar(k, v, p["step"])
        self.console.print(f"step {p['step']:>6}  loss {row['train_loss']:.4f}  "
                           f"val {task.metric} {value:.4f}  "
                           f"(best {p['best']:.4f} @ {p['best_step']})")

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimiser step on the global ``batch`` (this rank's rows of it); its loss."""
        t0 = time.perf_counter()
        self.model.train()
        d, cp = self.dist, self.context
        batch = cp.share(batch) if cp else d.share(batch)
        n = cp.count(batch) if cp else loss_count(self.task, batch) if d.active else 1
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.cfg.amp
               else contextlib.nullcontext())
        with ctx, cp.forward(self.model) if cp else contextlib.nullcontext():
            loss, units, objective = self.objective(batch)
        # the global batch's figures, and a non-finite loss on any rank stops every rank
        total, loss_sum, units, bad = d.sum([n, loss.item() * n, int(units),
                                             float(not torch.isfinite(objective))])
        if bad:
            self.checkpoint()
            raise FloatingPointError(f"training loss is {loss_sum / total} at step "
                                     f"{self.p['step']} (lr {self.sched.get_last_lr()[0]:.2e}); "
                                     f"try a lower lr or grad_clip")
        if d.active:  # DDP averages over ranks: sum_r (n_r / N) grad L_r, the global mean
            objective = objective * (d.world_size * n / total)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        p = self.p
        p["train_time_s"] += time.perf_counter() - t0
        p["step"] += 1
        p["batch"] += 1
        p["units"] += int(units)
        p["loss_sum"] += loss_sum / total
        p["loss_n"] += 1
        return loss_sum / total

    def after_step(self, interrupted: bool) -> str:
        """Evaluate and checkpoint when due; the run's status after this step."""
        cfg, p, status = self.cfg, self.p, "done"
        last = p["step"] >= cfg.max_steps
        over = cfg.time_budget_s is not None and p["train_time_s"] >= cfg.time_budget_s
        # every rank takes the same decisions: a budget or a signal met by one stops all
        over, interrupted = self.dist.any(over, interrupted)
        if p["step"] % cfg.eval_every == 0 or last or over:
            metrics = self.sharded_metrics("validation", cfg.eval_batches)
            status = self.dist.on_main(lambda: self._evaluate(metrics), share=True)
            self.checkpoint()
        elif p["step"] % cfg.checkpoint_every == 0:
            self.checkpoint()
        if over and status == "done":
            status = "time_budget"
        if interrupted:
            self.checkpoint()
            status = "interrupted"
        return status

    def _evaluate(self, metrics: dict | None = None) -> str:
        self.evaluate(metrics)
        stop = self.cfg.patience is not None and self.p["bad_evals"] >= self.cfg.patience
        return "early_stopped" if stop else "done"

    def loop(self, bar: TrainProgress, stop: StopFlag, stop_after: int | None) -> str:
        """Epochs of batches until max_steps, early stopping, the time budget or a stop."""
        p, status, steps_this_call = self.p, "done", 0
        bar.start_steps(p["step"])
        while p["step"] < self.cfg.max_steps and status == "done":
            batches = self.task.train_batches(p["epoch"])
            if len(batches) == 0:
                raise ConfigError(f"task {self.cfg.task!r} produced no training batches")
            bar.start_epoch(p["epoch"], len(batches), p["batch"])
            while p["batch"] < len(batches):
                bar.advance(self.step(batches[p["batch"]]))
                steps_this_call += 1
                status = self.after_step(stop.signal is not None
                                         or steps_this_call == stop_after)
                if p["step"] >= self.cfg.max_steps or status != "done":
                    break
            if p["batch"] >= len(batches):
                p["epoch"] += 1
                p["batch"] = 0
        return status


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
          progress: bool = True, console: Console | None = None,
          stop_after: int | None = None) -> RunResult:
    """Train ``cfg`` in ``run_dir``. ``stop_after`` (tests) behaves like a SIGTERM after
    that many steps of this call. Under torchrun every rank calls it alike; ranks other
    than 0 return a result without ``best``, ``test`` or ``summary``."""
    run_dir = Path(run_dir)
    d = join(cfg.device)
    if not d.is_main:
        progress, console = False, None
    console = console or Console(stderr=True, quiet=not progress)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d.check(cfg)
    cp = ContextParallel(cfg, d) if cfg.context_parallel else None  # refused before setup
    # rank 0 first: it checks the run directory and writes the task's files
    run = d.on_main(lambda: _Run(cfg, run_dir, _prepare_dir(cfg, run_dir, resume),
                                 console, d))
    if not d.is_main:
        state = load_checkpoint(run_dir / "checkpoint.pt") if resume else None
        run = _Run(cfg, run_dir, state, console, d)
    run.objective = d.wrap(run.objective)
    run.context = cp and cp.attach(run.model, run.task)  # collective: on every rank
    bar = TrainProgress(cfg.max_steps, enabled=progress, console=console)
    with StopFlag() as stop, bar:
        status = run.loop(bar, stop, stop_after)
    if run.writer is not None:
        run.writer.close()
    if status == "interrupted":
        console.print(f"interrupted at step {run.p['step']}: resume with --resume")
        return RunResult(run_dir, status, run.p["step"],
                         _best(run.history, run.task, run.p), None)
    best = test = None
    if run.sharded:  # the test split, shard by shard too: every rank needs the best weights
        best = d.on_main(lambda: load_checkpoint(run_dir / "best.pt"), share=True)
        run.model.load_state_dict(best["model"])
        test = run.sharded_metrics("test")
    result = d.on_main(lambda: _finish(run, run_dir, cfg, status, console, best, test))
    return result or RunResult(run_dir, status, run.p["step"], {}, None)


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _best(history: list[dict], task: Task, p: dict) -> dict[str, Any]:
    rows = [r for r in history if r["step"] == p["best_step"]]
    return rows[0] if rows else {}


def evaluate_all(task: Task, regime: Regime, model, split: str,
                 max_batches: int | None = None) -> dict[str, Any]:
    """The task's metrics on ``split`` and the regime's own (an attack's accuracy, ...)."""
    metrics = task.evaluate(model, split, max_batches)
    extra = regime.evaluate(model, split, max_batches)
    clash = sorted(set(metrics) & set(extra))
    if clash:
        raise RuntimeError(f"regime {regime.name!r} reports {clash}, which task "
                           f"{task.name!r} reports too: rename them")
    return {**metrics, **extra}


def _finish(run: _Run, run_dir: Path, cfg: TrainConfig, status: str,
            console: Console, best: dict | None = None,
            test: dict | None = None) -> RunResult:
    """Rank 0: the best weights' test metrics and the run's summary. ``best`` and
    ``test``: the best checkpoint, loaded into the model already, and the metrics the
    shards summed (context parallelism); else both are done here."""
    task, model, p, history = run.task, run.model, run.p, run.history
    if best is None:
        best = load_checkpoint(run_dir / "best.pt")
        model.load_state_dict(best["model"])
    if test is None:
        test = evaluate_all(task, run.regime, model, "test")
    key = f"val_{task.metric}"
    conv = convergence([r["step"] for r in history], [r["time_s"] for r in history],
                       [r[key] for r in history], mode=task.mode,
                       fraction=cfg.target_fraction)
    conv = None if conv is None else conv._asdict()
    summary = {
        "task": cfg.task, "mechanism": cfg.mechanism, "model": cfg.model, "seed": cfg.seed,
        "status": status, "steps": p["step"],
        "train_time_s": p["train_time_s"], "throughput": p["units"] / max(1e-9,
                                                                           p["train_time_s"]),
        "throughput_unit": f"{task.count_unit}/s", "metric": task.metric, "mode": task.mode,
        "best_step": p["best_step"], "best_validation": best["metrics"],
        "test": test, "convergence": conv, "target_fraction": cfg.target_fraction,
        **run.model_info, "data": task.info(),
    }
    write_json(run_dir / "summary.json", summary, default=float)
    console.print(f"[bold]{cfg.task}[/bold] {cfg.model}/{cfg.mechanism} seed {cfg.seed}: "
                  f"test {task.metric} {test[task.metric]:.4f} (best val "
                  f"{p['best']:.4f} @ step {p['best_step']}), {p['train_time_s']:.0f} s")
    return RunResult(run_dir, status, p["step"], _best(history, task, p), test, summary)


def load_trained(run_dir: str | Path, *, which: str = "best") -> tuple[Task, torch.nn.Module]:
    """The task (set up from the run's saved data and tokenizer) and its trained model."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json)")
    cfg = read_run_config(run_dir)
    task = get_task(cfg.task)(cfg, run_dir)
    task.setup()
    model = task.build_model()
    name = {"best": "best.pt", "last": "checkpoint.pt"}[which]
    model.load_state_dict(load_checkpoint(run_dir / name)["model"])
    return task, model.eval()

