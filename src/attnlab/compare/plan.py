"""What ``attnlab compare`` runs: mechanisms x (benchmark sweep + training seeds) on a task.

A :class:`Plan` is fixed before anything runs and saved as ``RUN_DIR/plan.json``; running
the same command again finds the plan there and resumes (finished benchmark points and
training seeds are kept). A different plan in the same directory is refused, never merged.

Profiles (``quick`` is the default and finishes in under 10 minutes on 2 CPU cores):

======== ============================================ =========================================
profile  benchmark (forward pass unless noted)        training
======== ============================================ =========================================
quick    N = 256, 512, 1024                           400 steps, 2 seeds, short ListOps (16-64)
standard N = 256 .. 4096, forward and forward+back.   1500 steps, 3 seeds, ListOps (16-128)
full     N = 1K .. 16K, both passes (bench standard)  the task's own defaults, 3 seeds
======== ============================================ =========================================

The embedded task is ListOps (Nangia & Bowman 2018, LRA's grammar), generated in memory:
nothing to download, readable tokens for attention maps, and every mechanism can train on
it (a bidirectional classification with padding). Other tasks take the profile's steps and
seeds with their own data options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.bench.grid import make_grid
from attnlab.files import FileFormatError, read_json, write_json
from attnlab.registry import get, list_mechanisms, resolve_name
from attnlab.train.config import ConfigError, check_names
from attnlab.train.regimes import get_regime
from attnlab.train.task import get_task
from attnlab.util.checks import did_you_mean

__all__ = ["DEFAULT_TASK", "PROFILES", "Plan", "make_plan", "load_or_save", "read_plan"]

DEFAULT_TASK = "listops"

# Training hyperparameters scaled to sequences of 16-128 tokens (the registry's defaults,
# e.g. window 128, bucket 64, k 256, are sized for 1K+ tokens and would make most of these
# mechanisms exact softmax attention here; the benchmark keeps its own long-sequence ones).
SHORT_HPARAMS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 16, "block_size": 16},
    "dilated_window": {"window": 16, "block_size": 16, "dilation": 2},
    "longformer": {"window": 16, "block_size": 16},
    "bigbird": {"window": 16, "block_size": 8, "num_random_blocks": 2},
    "local": {"block_size": 16},
    "block_sparse": {"block_size": 16},
    "sparse_transformer": {"stride": 16, "c": 4, "block_size": 8},
    "reformer": {"bucket_size": 8},
    "sinkhorn": {"block_size": 8},
    "linformer": {"k": 16},
    "performer": {"num_features": 32},
    "adaptive_span": {"max_span": 32, "ramp": 8, "block_size": 16},
    "nystromformer": {"num_landmarks": 8},  # m <= the shortest padded batch (min_length)
    "hierarchical": {"block_size": 8},  # coarse levels begin beyond 2 blocks: 16 tokens
    "luong_monotonic": {"window": 8},
    "luong_predictive": {"window": 8},
    "persistent_memory": {"num_slots": 16},
    "hybrid": {"heads": "sliding_window(window=16,block_size=16)*2+sdpa*2"},
}
# Needed at any length: a padded batch can be shorter than the default 32 landmarks.
ALWAYS_HPARAMS: dict[str, dict[str, Any]] = {"nystromformer": {"num_landmarks": 8}}

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "bench": {"profile": "quick"},
        "seeds": [0, 1],
        "train": {"max_steps": 400, "eval_every": 50, "warmup_steps": 40, "lr": 1e-3,
                  "batch_size": 32, "model_kwargs": {"d_model": 64, "num_layers": 2}},
        "task_kwargs": {"listops": {"n_train": 4000, "n_validation": 500, "n_test": 500,
                                    "min_length": 16, "max_len": 64, "max_depth": 3,
                                    "pad_multiple": 8}},
        "hparams": SHORT_HPARAMS,
    },
    "standard": {
        "bench": {"profile": "quick", "lengths": [256, 512, 1024, 2048, 4096],
                  "passes": ["fwd", "fwd+bwd"], "min_run_time": 0.2, "timeout_s": 120.0},
        "seeds": [0, 1, 2],
        "train": {"max_steps": 1500, "eval_every": 250, "warmup_steps": 100, "lr": 1e-3,
                  "batch_size": 32, "model_kwargs": {"d_model": 64, "num_layers": 2}},
        "task_kwargs": {"listops": {"n_train": 20000, "n_validation": 1000, "n_test": 1000,
                                    "min_length": 16, "max_len": 128, "max_depth": 5,
                                    "pad_multiple": 8}},
        "hparams": SHORT_HPARAMS,
    },
    "full": {
        "bench": {"profile": "standard"},
        "seeds": [0, 1, 2],
        "train": {},
        "task_kwargs": {"listops": {"pad_multiple": 64}},  # Reformer's/Sinkhorn's 64-chunks
        "hparams": ALWAYS_HPARAMS,
    },
}


@dataclass(frozen=True)
class Plan:
    """Everything a compare runs; equal plans resume each other."""

    task: str
    profile: str
    mechanisms: tuple[str, ...]
    seeds: tuple[int, ...]
    bench: dict[str, Any]                      # make_grid settings
    train: dict[str, Any]                      # TrainConfig fields shared by every run
    mechanism_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # mechanism -> why not trained
    # A study of a suite (see SUITES): its name, and the directory (relative to its own)
    # whose results.db holds the suite's one benchmark sweep; "" = its own sweep.
    label: str = ""
    bench_dir: str = ""

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(**{**data, "mechanisms": tuple(data["mechanisms"]),
                      "seeds": tuple(data["seeds"])})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()
                              ).hexdigest()[:16]

    def trained(self) -> list[str]:
        return [m for m in self.mechanisms if m not in self.skipped]

    def config(self, mechanism: str, seed: int):
        """The TrainConfig of one training run."""
        return get_task(self.task).make_config(
            **self.train, mechanism=mechanism, seed=seed,
            mechanism_kwargs=self.mechanism_kwargs.get(mechanism, {}))


def _mechanisms(names: list[str] | None) -> tuple[str, ...]:
    if not names or names == ["all"]:
        return tuple(list_mechanisms())
    out = []
    for n in names:
        try:
            canonical = resolve_name(n)
        except ValueError as e:  # names the close matches already
            raise ConfigError(f"--mechanisms: {e}") from None
        if canonical in out:
            raise ConfigError(f"--mechanisms: {n!r} is given twice")
        out.append(canonical)
    return tuple(out)


def make_plan(*, task: str | None = None, profile: str = "quick",
              mechanisms: list[str] | None = None, seeds: list[int] | None = None,
              max_steps: int | None = None, task_kwargs: dict[str, Any] | None = None,
              threads: int = 1, regime: str | None = None,
              regime_kwargs: dict[str, Any] | None = None) -> Plan:
    """A validated plan; every error (unknown names, bad values) before anything runs.
    ``regime`` / ``regime_kwargs``: the training regime of every run (``attnlab train
    --regime``); left out of the plan when standard, so earlier plans resume as before."""

    if profile not in PROFILES:
        hint = did_you_mean(profile, PROFILES, n=1, cutoff=0.6, style="paren")
        raise ConfigError(f"--profile: unknown profile {profile!r}{hint}; "
                          f"known: {', '.join(PROFILES)}")
    prof = PROFILES[profile]
    task = task or DEFAULT_TASK
    cls = get_task(task)  # unknown task -> ConfigError with close matches
    if "transformer" not in cls.models:
        raise ConfigError(f"--task: {task!r} has no transformer model to put mechanisms in")
    names = _mechanisms(mechanisms)
    seeds = list(prof["seeds"] if seeds is None else seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds: expected distinct integers >= 0; got {seeds}")
    train = {**prof["train"], "threads": threads,
             "task_kwargs": {**prof["task_kwargs"].get(task, {}), **(task_kwargs or {})}}
    if max_steps is not None:
        train["max_steps"] = max_steps
        train["eval_every"] = min(train.get("eval_every", max_steps), max_steps)
        train["warmup_steps"] = min(train.get("warmup_steps", 0), max_steps // 4)
    train["checkpoint_every"] = train.get("eval_every", 200)
    if (regime or "standard") != "standard" or regime_kwargs:
        regime = regime or "standard"
        check_names(regime_kwargs or {}, get_regime(regime).options,  # unknown -> named
                    what=f"--regime-opt: regime {regime!r}: unknown option(s)")
        train["regime"], train["regime_kwargs"] = regime, dict(regime_kwargs or {})
    cls.make_config(**train)  # validates every field and the task's options by name
    skipped = {}
    for m in names:  # what the task's model needs that the mechanism does not have
        s = get(m)
        if cls.kind in ("language_model", "sequence", "seq2seq") and not s.causal:
            skipped[m] = f"no causal form ({task} decodes left to right)"
        elif cls.kind == "seq2seq" and not s.cross:
            skipped[m] = f"no cross-attention ({task} is encoder-decoder)"
        elif cls.kind == "classification" and not s.key_padding:
            skipped[m] = f"no key-padding mask ({task} pads its batches; every output of " \
                         f"{m} mixes every position)"
    plan = Plan(task=task, profile=profile, mechanisms=names, seeds=tuple(seeds),
                bench={**prof["bench"], "mechanisms": list(names)}, train=train,
                mechanism_kwargs={m: dict(prof["hparams"][m]) for m in names
                                  if m in prof["hparams"]},
                skipped=skipped)
    bench = dict(plan.bench)
    make_grid(profile=bench.pop("profile", None), where="compare", **bench)  # validate
    return plan


def load_or_save(plan: Plan, run_dir: Path) -> bool:
    """Save ``plan`` in ``run_dir``; True when an identical plan was already there (resume).
    A different plan there is a ConfigError naming the fields that differ."""
    path = Path(run_dir) / "plan.json"
    if path.exists():
        old = read_json(path, "compare plan")
        if old == plan.to_json():
            return True
        diff = sorted(k for k in set(old) | set(plan.to_json())
                      if old.get(k) != plan.to_json().get(k))
        raise ConfigError(f"--out: {run_dir} holds another comparison (it differs in "
                          f"{', '.join(diff)}); choose another --out, or rebuild its report "
                          f"with `attnlab report {run_dir}`")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, plan.to_json(), sort_keys=True)
    return False


def read_plan(path: str | Path) -> Plan:
    """The plan saved in ``path`` (a ``plan.json``); every problem names the file."""
    data = read_json(path, "compare plan")
    try:
        return Plan.from_json(data)
    except (TypeError, KeyError) as e:  # a field missing, unknown or of the wrong kind
        raise FileFormatError(f"compare plan {path}: not a plan of this attnlab "
                              f"({type(e).__name__}: {e})") from None
