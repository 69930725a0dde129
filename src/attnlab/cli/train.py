"""``attnlab tasks | train | generate | inpaint``: train any mechanism on a task, use the result.

Options reach four places, each validated by its owner before anything runs:
``--set field=value`` (TrainConfig: lr, max_steps, ...), ``--task-opt key=value`` (the task:
data_dir, max_len, tokenizer, ...), ``--model-opt key=value`` (model shape: d_model,
num_layers, ...), ``--mech-opt key=value`` (the mechanism's hyperparameters) and
``--regime-opt key=value`` (the training regime's: ``--regime adversarial``, ...).
Values are read as JSON when they parse (``3``, ``1e-3``, ``true``, ``null``), else as text.

Data-parallel training on this machine: ``attnlab train --nproc P ...`` starts P processes
(PyTorch's elastic launcher, as ``torchrun --standalone --nproc-per-node P`` does), each
running this command; under ``torchrun`` (several machines) the command sees its
environment and joins the job. The global ``--batch-size`` is shared by the processes;
only rank 0 writes the run (attnlab.train.distributed). With ``--context-parallel``
(and ``--mechanism ring``) every process takes all rows but its shard of each sequence,
ring attention passing the keys and values between them (attnlab.train.context).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from attnlab.bench.grid import read_settings
from attnlab.cli import plain, positive_int
from attnlab.cli.errors import report_error, take_debug_flag
from attnlab.files import writable_dir
from attnlab.tasks import get_task, list_tasks
from attnlab.train.config import ConfigError, TrainConfig
from attnlab.train.context import check_config
from attnlab.train.distributed import (
    check_global_batch,
    join,
    launch,
    under_launcher,
)
from attnlab.train.loop import load_trained, train
from attnlab.train.regimes import get_regime, list_regimes
from attnlab.train.runs import train_seeds

__all__ = ["add_parsers", "HANDLERS"]


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def key_value_pairs(items: list[str] | None, flag: str) -> dict:
    """``--flag key=value`` items as a dict (values parsed as JSON where they parse)."""
    out = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects key=value; got {item!r}")
        out[key.strip().replace("-", "_")] = _value(val)
    return out


def _read_config(path: str) -> dict:
    return read_settings(path, f"--config {path}", allow_json=True)


def build_config(args) -> TrainConfig:
    base = _read_config(args.config) if args.config else {}
    task = args.task or base.get("task")
    if not task:
        raise ConfigError("attnlab train needs --task (see `attnlab tasks`)")
    cls = get_task(task)
    fields = {**base, **key_value_pairs(args.set, "--set")}
    for flag in ("mechanism", "model", "max_steps", "batch_size", "lr", "device", "regime",
                 "init_from"):
        if getattr(args, flag) is not None:
            fields[flag] = getattr(args, flag)
    if args.time_budget is not None:
        fields["time_budget_s"] = args.time_budget
    if args.context_parallel:
        fields["context_parallel"] = True
    for key, flag in (("task_kwargs", "task_opt"), ("model_kwargs", "model_opt"),
                      ("mechanism_kwargs", "mech_opt"), ("regime_kwargs", "regime_opt")):
        fields[key] = {**fields.get(key, {}),
                       **key_value_pairs(getattr(args, flag), f"--{flag}")}
    if args.data_dir:
        if "data_dir" not in cls.options:
            raise ConfigError(f"task {cls.name!r} generates its data (or ships it with a "
                              f"library): --data-dir does not apply; drop it")
        fields["task_kwargs"]["data_dir"] = args.data_dir
    fields.pop("task", None)
    return cls.make_config(**fields)


def default_run_dir(cfg: TrainConfig) -> Path:
    who = cfg.mechanism if cfg.model == "transformer" else cfg.model
    return Path(os.environ.get("ATTNLAB_RUNS", "runs")) / cfg.task / who


def cmd_tasks(args, console: Console) -> int:
    table = Table(title="tasks (attnlab train --task NAME)")
    for col in ("task", "kind", "metric", "models", "options (defaults)", "what"):
        table.add_column(col, overflow="fold")
    for name in list_tasks():
        t = get_task(name)
        opts = ", ".join(f"{k}={v}" for k, v in t.options.items())
        table.add_row(name, t.kind, f"{t.metric} ({t.mode})", ", ".join(t.models), opts,
                      t.summary)
    console.print(table)
    regimes = Table(title="training regimes (attnlab train --regime NAME --regime-opt k=v)")
    for col in ("regime", "options (defaults)", "what"):
        regimes.add_column(col, overflow="fold")
    for name in list_regimes():
        r = get_regime(name)
        regimes.add_row(name, ", ".join(f"{k}={v}" for k, v in r.options.items()), r.summary)
    console.print(regimes)
    return 0


def rank_main(args) -> None:
    """One process of ``attnlab train --nproc P``: the command, in the launcher's
    environment; its error in one line, as the command gives it, and its exit code."""
    args.nproc = None
    try:
        code = cmd_train(args, Console(width=160))
    except KeyboardInterrupt:
        code = 130
    except Exception as e:
        code = report_error(e, debug=take_debug_flag([])[1])
    if code:
        sys.exit(code)


def _follow_seeds(cfg: TrainConfig, seeds: list[int], run_dir: Path, resume: bool) -> int:
    """A rank other than 0 trains the seeds rank 0 trains (train_seeds), writing nothing.
    Which seeds a resume keeps or continues is read before any of them trains: only the
    seed in training changes its files."""
    plan = [(s, resume and (run_dir / f"seed-{s}" / "summary.json").exists(),
             resume and (run_dir / f"seed-{s}" / "checkpoint.pt").exists()) for s in seeds]
    for seed, kept, again in plan:
        if kept:
            continue
        if train(cfg.replace(seed=seed), run_dir / f"seed-{seed}", resume=again,
                 progress=False).status == "interrupted":
            return 130
    return 0


def cmd_train(args, console: Console) -> int:
    cfg = build_config(args)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    if args.nproc is not None:
        if under_launcher():
            raise ConfigError("--nproc: this process was started by torchrun, which set the "
                              "number of processes (--nproc-per-node); drop --nproc")
        if args.nproc > 1:  # once, before P processes start
            check_config(cfg)
            if not cfg.context_parallel:
                check_global_batch(cfg.batch_size, args.nproc)
            return launch(args.nproc, rank_main, (args,))
    if not join(cfg.device).is_main:
        return _follow_seeds(cfg, args.seeds, run_dir, args.resume)
    return _train_main(args, cfg, run_dir, console)


def _train_main(args, cfg: TrainConfig, run_dir: Path, console: Console) -> int:
    if args.data_dir is None and os.environ.get("ATTNLAB_DATA"):
        console.print(f"data from ATTNLAB_DATA={os.environ['ATTNLAB_DATA']}")
    console.print(f"run directory: {run_dir}")
    agg = train_seeds(cfg, args.seeds, run_dir, resume=args.resume, db=args.db,
                      progress=not args.no_progress, console=console)
    if agg is None:
        return 130
    table = Table(title=f"{cfg.task}: {cfg.model}/{cfg.mechanism}, seeds {agg['seeds']}")
    table.add_column("figure")
    table.add_column("mean ± std")
    for key, val in agg["test"].items():
        if val is not None:
            table.add_row(f"test {key}", f"{val['mean']:.4f} ± {val['std']:.4f}")
    for key in ("train_time_s", "throughput", "convergence_step", "convergence_time_s"):
        val = agg[key]
        if val is not None:
            table.add_row(key, f"{val['mean']:.1f} ± {val['std']:.1f}")
    console.print(table)
    console.print(f"summary: {run_dir / 'summary.json'}")
    return 0


def cmd_generate(args, console: Console) -> int:
    task, model = load_trained(args.run)
    tok = getattr(task, "tokenizer", None)
    if task.kind != "language_model" or tok is None:
        raise ConfigError(f"{args.run} is a {task.name!r} run; generate needs a language "
                          f"model run (e.g. --task wikitext2)")
    if not callable(getattr(model, "generate", None)):
        raise ConfigError(f"{args.run} is a {task.name!r} run, whose model does not sample "
                          f"text; generate from a --task wikitext2 run")
    ids = tok.encode(args.prompt) or [tok.token_to_id("[BOS]") or 0]
    g = torch.Generator().manual_seed(args.seed)
    use_cache = {"auto": None, "yes": True, "no": False}[args.cache]
    start = time.perf_counter()
    out = model.generate(torch.tensor([ids]), args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         generator=g, use_cache=use_cache)
    seconds = time.perf_counter() - start
    print(tok.decode(out[0].tolist()))
    spec = model.spec
    how = ("recomputing the context" if use_cache is False or not model.can_cache() else
           "a KV cache" if spec.kv_cache else "its bounded state (StateCache)")
    new = out.shape[1] - len(ids)
    # on stderr: stdout is the text alone, for pipes
    print(f"{new} tokens in {seconds:.2f} s ({new / max(seconds, 1e-9):.1f} tokens/s), "
          f"{spec.name} decoding with {how}", file=sys.stderr)
    return 0


def cmd_inpaint(args, console: Console) -> int:
    out = Path(args.out or (Path(args.run) / "inpainting.png"))
    # before the model is loaded and run: a read-only destination is said at once
    writable_dir(out.parent, "--out" if args.out else "inpaint",
                 hint="" if args.out else "pass --out to write the figure elsewhere")
    task, model = load_trained(args.run)
    if not hasattr(task, "inpaint_figure"):
        raise ConfigError(f"{args.run} is a {task.name!r} run; inpaint needs an inpainting "
                          f"run (e.g. --task inpaint_digits)")
    metrics = task.inpaint_figure(model, out, n=args.n, split=args.split)
    console.print(f"wrote {out} ({metrics})")
    return 0


def add_parsers(sub) -> None:
    sub.add_parser("tasks", help="the tasks attnlab can train on: data, metric, models, options")
    _add_train(sub.add_parser("train", help="train a model with a mechanism on a task",
                              description=plain(__doc__)))
    _add_generate(sub.add_parser("generate", help="sample text from a trained language model "
                                                  "run"))
    pi = sub.add_parser("inpaint", help="before / masked / after images from an inpainting run")
    pi.add_argument("run", help="run directory of one seed")
    pi.add_argument("--n", type=int, default=8, help="images")
    pi.add_argument("--split", default="test", help="data split the images come from")
    pi.add_argument("--out", help="PNG path (default RUN/inpainting.png)")


def _add_train(pt) -> None:
    task = "(default: the task's)"
    pt.add_argument("--task", help="a task of attnlab tasks")
    pt.add_argument("--mechanism", help="attention mechanism (default: sdpa)")
    pt.add_argument("--model", help="transformer (default) or the task's baseline (lstm, unet)")
    pt.add_argument("--config", help="TOML / JSON / YAML file of TrainConfig fields (flags "
                                     "given here override it)")
    pt.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    pt.add_argument("--max-steps", type=int, help=f"training steps {task}")
    pt.add_argument("--batch-size", type=int, help=f"examples per step {task}")
    pt.add_argument("--lr", type=float, help=f"peak learning rate {task}")
    pt.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    pt.add_argument("--time-budget", type=float, help="seconds of training per seed (default: "
                                                      "no limit)")
    pt.add_argument("--data-dir", help="dataset files (default: $ATTNLAB_DATA, else download)")
    pt.add_argument("--run-dir", help="where the run goes (default: runs/<task>/<mechanism or "
                                      "model>, under $ATTNLAB_RUNS if set)")
    pt.add_argument("--resume", action="store_true", help="continue an interrupted run")
    pt.add_argument("--db", help="also record results in this SQLite database")
    pt.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="a TrainConfig field: lr, max_steps, eval_every, ... (repeatable)")
    pt.add_argument("--task-opt", action="append", metavar="KEY=VALUE",
                    help="a task option: data_dir, max_len, tokenizer, ... (repeatable; see "
                         "attnlab tasks)")
    pt.add_argument("--model-opt", action="append", metavar="KEY=VALUE",
                    help="a model shape option: d_model, num_layers, ... (repeatable)")
    pt.add_argument("--mech-opt", action="append", metavar="KEY=VALUE",
                    help="a hyperparameter of the mechanism (repeatable; see attnlab info "
                         "NAME)")
    pt.add_argument("--regime", help="how the model is trained: standard (default), "
                                     "adversarial, distill, ... (see attnlab tasks)")
    pt.add_argument("--regime-opt", action="append", metavar="KEY=VALUE",
                    help="an option of the regime (repeatable)")
    pt.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT",
                    help="start from the weights of a finished run (one seed's directory, "
                         "or its best.pt) wherever names and shapes agree, e.g. a "
                         "pre-trained encoder")
    pt.add_argument("--no-progress", action="store_true", help="no progress bar")
    pt.add_argument("--nproc", type=positive_int, metavar="P",
                    help="data-parallel training in P processes on this machine (the global "
                         "batch shared; under torchrun: not needed). Default: one process")
    pt.add_argument("--context-parallel", action="store_true",
                    help="with several processes, shard each sequence over them instead of "
                         "the rows (ring attention: needs --mechanism ring; language-model "
                         "tasks)")


def _add_generate(pg) -> None:
    pg.add_argument("run", help="run directory (one seed: runs/wikitext2/sdpa/seed-0)")
    pg.add_argument("--prompt", default="", help="text to continue (default: none)")
    pg.add_argument("--max-new-tokens", type=int, default=50, help="tokens to sample")
    pg.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    pg.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (default: "
                                             "all)")
    pg.add_argument("--top-p", type=float, help="nucleus sampling: the likeliest tokens of "
                                               "total probability p (default: all)")
    pg.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    pg.add_argument("--cache", choices=("auto", "yes", "no"), default="auto",
                    help="decode incrementally (a KV cache, or the mechanism's bounded "
                         "state: linear, performer, windows, the gated recurrences): auto "
                         "when the mechanism can, yes requires it, no recomputes the context")


HANDLERS = {"tasks": cmd_tasks, "train": cmd_train, "generate": cmd_generate,
            "inpaint": cmd_inpaint}
