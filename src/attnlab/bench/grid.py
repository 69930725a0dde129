"""What a sweep measures: a grid of configurations, from flags, a profile or a sweep file.

A grid is the product ``mechanisms x lengths x batch x heads x head_dim x dtype x pass x
causal``. A mechanism entry is a registered name, optionally with hyperparameters
(``{"name": "sliding_window", "window": 128}`` in a sweep file); its *label* is the name
plus its hyperparameters, the benchmark-sized :data:`LONG_HPARAMS` included (unless
``long_hparams = false``: then a mechanism gets the registry's defaults, as a user does),
and is what a line in a plot stands for. The groups ``all``, ``approximate`` and
``subquadratic`` (every mechanism whose registry ``memory`` claim has no ``N^2`` term)
expand to registered names. A ``block_sparse`` layout can be named (``layout = "band:1"``,
:mod:`attnlab.bench.layouts`). Everything is validated before anything runs or any
database is opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from attnlab.bench import layouts, peers  # peer:NAME entries (PyPI implementations)
from attnlab.registry import get, list_mechanisms
from attnlab.util.checks import check_bool, check_int, did_you_mean

__all__ = ["LONG_HPARAMS", "PROFILES", "Grid", "MechanismEntry", "Point",
           "claims_subquadratic_memory", "grid_from_file", "make_grid"]

DTYPES = ("float32", "float16", "bfloat16", "float64")
PASSES = ("fwd", "fwd+bwd")
# Benchmark-sized hyperparameters (the registry's defaults suit short inputs and tests).
LONG_HPARAMS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 256},
    "dilated_window": {"window": 256},
    "longformer": {"window": 256},
    "bigbird": {"window": 256},
    "local": {"block_size": 256},
}

PROFILES: dict[str, dict[str, Any]] = {
    # Every mechanism at short lengths, forward only: a smoke test of the machine in < 3 min.
    "quick": {"lengths": [256, 512, 1024], "batch": [1], "heads": [4], "head_dim": [64],
              "passes": ["fwd"], "min_run_time": 0.1, "timeout_s": 60.0},
    # The comparison in docs/benchmarks.md: 1K..16K, both passes.
    "standard": {"lengths": [1024, 2048, 4096, 8192, 16384], "batch": [1], "heads": [8],
                 "head_dim": [64], "passes": ["fwd", "fwd+bwd"], "min_run_time": 0.3,
                 "timeout_s": 120.0},
    # Long context: the sub-quadratic mechanisms and the exact yardsticks up to 64K.
    "long": {"lengths": [4096, 8192, 16384, 32768, 65536], "batch": [1], "heads": [8],
             "head_dim": [64], "passes": ["fwd"], "min_run_time": 0.3, "timeout_s": 600.0,
             "mechanisms": "approximate+sdpa+flash"},
}


@dataclass(frozen=True)
class MechanismEntry:
    name: str  # canonical registry name
    hparams: tuple[tuple[str, Any], ...] = ()  # sorted items; validated against the registry

    @property
    def label(self) -> str:
        if not self.hparams:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.hparams)})"


@dataclass(frozen=True)
class Point:
    """One measurement: a mechanism at one configuration."""

    mechanism: str
    label: str
    hparams: tuple[tuple[str, Any], ...]
    N: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    pass_: str
    causal: bool
    device: str

    @property
    def key(self) -> str:
        """Identifies the point within a run (resume skips keys already stored)."""
        return (f"{self.label}|N={self.N}|B={self.batch}|H={self.heads}|D={self.head_dim}|"
                f"{self.dtype}|{self.pass_}|{'causal' if self.causal else 'full'}|{self.device}")

    @property
    def series(self) -> tuple:
        """The point without its length: a line in a plot, a row in the table."""
        return (self.label, self.batch, self.heads, self.head_dim, self.dtype, self.pass_,
                self.causal, self.device)

    def unsupported(self) -> str | None:
        """Why the mechanism cannot run this configuration at all (from its registry flags)."""
        if peers.is_peer(self.mechanism):  # peer: not installed, flags, N constraints
            return peers.unsupported(self.mechanism, n=self.N, hparams=dict(self.hparams),
                                     causal=self.causal, pass_=self.pass_, dtype=self.dtype)
        s = get(self.mechanism)
        if self.causal and not s.causal:
            return f"{s.name} has no causal form"
        if self.pass_ == "fwd+bwd" and not s.differentiable:
            return f"{s.name} has no backward"
        if self.dtype in ("float16", "bfloat16") and not s.half_precision:
            return f"{s.name} does not take {self.dtype}"
        return None


@dataclass(frozen=True)
class Grid:
    mechanisms: tuple[MechanismEntry, ...]
    lengths: tuple[int, ...]
    batch: tuple[int, ...] = (1,)
    heads: tuple[int, ...] = (8,)
    head_dim: tuple[int, ...] = (64,)
    dtypes: tuple[str, ...] = ("float32",)
    passes: tuple[str, ...] = ("fwd",)
    causal: tuple[bool, ...] = (False,)
    device: str = "cpu"
    threads: int = 2
    min_run_time: float = 0.3
    timeout_s: float = 300.0
    mem_cap_gib: float | None = None  # None: 90% of the machine's RAM
    error_max_n: int = 16384  # above this, skip the error measurement (exact costs N^2)
    long_hparams: bool = True  # False: the registry's defaults, not LONG_HPARAMS
    profile: str | None = None

    def points(self) -> list[Point]:
        """Every point, shortest lengths first within each series (failures then skip
        longer ones)."""
        out = []
        for m, B, H, D, dt, p, c in itertools.product(
                self.mechanisms, self.batch, self.heads, self.head_dim, self.dtypes,
                self.passes, self.causal):
            for n in sorted(self.lengths):
                out.append(Point(m.name, m.label, m.hparams, n, B, H, D, dt, p, c, self.device))
        return out

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["mechanisms"] = [{"name": m.name, **dict(m.hparams)} for m in self.mechanisms]
        return d

    def digest(self) -> str:
        """Hash of what is measured (not of how long each timing runs): resume key."""
        d = self.to_json()
        for k in ("min_run_time", "timeout_s", "mem_cap_gib", "profile"):
            d.pop(k)
        if d["long_hparams"]:  # the default: a grid's digest is what it was before the key
            d.pop("long_hparams")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------- validation
def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def _ints(where: str, name: str, values, low: int = 1) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        _fail(where, f"{name} must be a non-empty list of ints; got {values!r}")
    for v in values:
        try:
            check_int(name, v, low=low)
        except (TypeError, ValueError):  # a grid's errors are all ValueErrors (config)
            _fail(where, f"{name} must hold ints >= {low}; got {v!r} in {list(values)}")
    return tuple(dict.fromkeys(values))


def _choices(where: str, name: str, values, allowed) -> tuple:
    if isinstance(values, (str, bool)):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        _fail(where, f"{name} must be a non-empty list; got {values!r}")
    for v in values:
        if v not in allowed:
            hint = did_you_mean(v, allowed, cutoff=0.6, style="paren")
            _fail(where, f"{name} must be among {list(allowed)}; got {v!r}{hint}")
    return tuple(dict.fromkeys(values))


def _entry(where: str, item, defaults: dict) -> MechanismEntry:
    if isinstance(item, str):
        name, hp = item, {}
    elif isinstance(item, dict) and isinstance(item.get("name"), str):
        name, hp = item["name"], {k: v for k, v in item.items() if k != "name"}
    else:
        _fail(where, f"a mechanism is a name or a table with a 'name' key; got {item!r}")
    if name.startswith(peers.PREFIX):  # peer:NAME: checked against peers.PEERS, all hparams
        try:
            spec = peers.resolve(name)
            merged = peers.validate_hparams(name, hp)
        except (TypeError, ValueError) as e:
            _fail(where, str(e))
        return MechanismEntry(spec.label, tuple(sorted(merged.items())))
    try:
        spec = get(name)  # unknown names: ValueError with close matches
    except ValueError as e:
        _fail(where, str(e))
    merged = {**defaults.get(spec.name, {}), **hp}
    # Names and values are checked by _check_hparams, once the grid's shapes are known.
    # Benchmark-sized defaults are part of the label: "sliding_window(window=256)".
    return MechanismEntry(spec.name, tuple(sorted(merged.items())))


def _check_hparams(where: str, grid: Grid) -> None:
    """Validate each registered mechanism's hyperparameters as ``create_for`` will in every
    child, with the ``head_dim``, ``num_heads`` and ``max_seq_len`` it fills in from the
    grid: a bad value (``window=-1``) refuses the grid before anything runs, from a flag
    or a sweep file alike, instead of storing each of its points as an ``error``. (Peers
    were validated whole in :func:`_entry`; constructor checks that depend on N stay per
    point.)"""
    shapes = list(itertools.product(grid.head_dim, grid.heads, grid.lengths))
    for m in grid.mechanisms:
        if peers.is_peer(m.name):
            continue
        spec = get(m.name)
        declared = {h.name for h in spec.hparams}
        for d, h, n in shapes:
            context = {"head_dim": d, "num_heads": h, "max_seq_len": n}
            filled = {k: v for k, v in context.items() if k in declared}
            try:
                given = layouts.resolve(spec.name, dict(m.hparams), n)  # "band:1" -> tensor
                spec.validate_hparams({**filled, **given})
            except (TypeError, ValueError) as e:
                _fail(where, str(e))


def _mechanisms(where: str, spec, defaults: dict) -> tuple[MechanismEntry, ...]:
    """Entries from a name, ``"a+b"``, a table or a list of those; the groups ``all``,
    ``approximate`` and ``subquadratic`` expand wherever they stand (``["all",
    "peer:local_attention"]``)."""
    if spec is None:
        spec = "all"
    if isinstance(spec, str):
        spec = spec.split("+")
    items = [spec] if isinstance(spec, dict) else spec
    if not isinstance(items, (list, tuple)) or not items:
        _fail(where, f"mechanisms must be a non-empty list; got {spec!r}")
    groups = {"all": list_mechanisms(), "approximate": list_mechanisms(exact=False),
              "subquadratic": [n for n in list_mechanisms() if claims_subquadratic_memory(n)]}
    items = [m for i in items for m in (groups[i] if isinstance(i, str) and i in groups
                                        else [i])]
    return tuple(dict.fromkeys(_entry(where, i, defaults) for i in items))


def make_grid(*, profile: str | None = None, where: str = "bench", **given) -> Grid:
    """A validated :class:`Grid` from a profile's values overridden by ``given`` (``None``
    values mean "not given")."""
    if profile is not None and profile not in PROFILES:
        hint = did_you_mean(profile, PROFILES, cutoff=0.6, style="paren")
        _fail(where, f"unknown profile {profile!r}{hint}; known: {list(PROFILES)}")
    base = dict(PROFILES[profile]) if profile else {}
    known = {f.name for f in dataclasses.fields(Grid)}
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        hints = ", ".join(
            f"{u!r}{did_you_mean(u, sorted(known), n=1, cutoff=0.6, style='paren')}"
            for u in unknown)
        _fail(where, f"unknown setting {hints}; known: {sorted(known)}")
    cfg = {**base, **given}
    if "lengths" not in cfg:
        _fail(where, "no sequence lengths: give lengths (--n) or a profile")
    try:
        long_hparams = check_bool("long_hparams", cfg.get("long_hparams", True), who=where)
    except TypeError as e:
        raise ValueError(str(e)) from None
    defaults = LONG_HPARAMS if long_hparams else {}
    device = cfg.get("device", "cpu")
    if device not in ("cpu", "cuda"):
        _fail(where, f"device must be 'cpu' or 'cuda'; got {device!r}")
    grid = Grid(
        mechanisms=_mechanisms(where, cfg.get("mechanisms"), defaults),
        lengths=_ints(where, "lengths", cfg["lengths"]),
        batch=_ints(where, "batch", cfg.get("batch", [1])),
        heads=_ints(where, "heads", cfg.get("heads", [8])),
        head_dim=_ints(where, "head_dim", cfg.get("head_dim", [64])),
        dtypes=_choices(where, "dtypes", cfg.get("dtypes", ["float32"]), DTYPES),
        passes=_choices(where, "passes", cfg.get("passes", ["fwd"]), PASSES),
        causal=_choices(where, "causal", cfg.get("causal", [False]), (False, True)),
        device=device,
        threads=_ints(where, "threads", cfg.get("threads", 2))[0],
        min_run_time=_positive(where, "min_run_time", cfg.get("min_run_time", 0.3)),
        timeout_s=_positive(where, "timeout_s", cfg.get("timeout_s", 300.0)),
        mem_cap_gib=(None if cfg.get("mem_cap_gib") is None
                     else _positive(where, "mem_cap_gib", cfg["mem_cap_gib"])),
        error_max_n=_ints(where, "error_max_n", cfg.get("error_max_n", 16384))[0],
        long_hparams=long_hparams,
        profile=profile,
    )
    _check_hparams(where, grid)
    return grid


_QUADRATIC = re.compile(r"N\s*\^\s*2|N²")


def claims_subquadratic_memory(name: str) -> bool:
    """Whether the registry's ``memory`` claim for ``name`` has no ``N^2`` term (the
    ``subquadratic`` group: ``O(N)``, ``O(N k + k L)`` and ``O((N/b)^2)`` are in,
    ``O(N^2)`` and ``O(chunk N A) forward (autograd keeps O(N^2 A))`` are out)."""
    return not _QUADRATIC.search(get(name).memory)


def _positive(where: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        _fail(where, f"{name} must be a number > 0; got {v!r}")
    return float(v)


def read_settings(path: str | Path, where: str, *, allow_json: bool = False) -> dict:
    """The non-empty table of settings in a TOML (``.toml``), YAML (``.yaml``/``.yml``,
    needs PyYAML) or, with ``allow_json``, JSON file; every problem is a ValueError that
    starts with ``where``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        _fail(where, f"cannot read it ({e.strerror or e})")
    except UnicodeDecodeError as e:
        _fail(where, f"not UTF-8 text ({e})")
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            _fail(where, f"malformed TOML: {e}")
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            _fail(where, "reading YAML needs PyYAML: pip install pyyaml (or use a .toml file)")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            _fail(where, f"malformed YAML: {e}")
    elif path.suffix == ".json" and allow_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            _fail(where, f"malformed JSON: {e}")
    else:
        kinds = ".toml, .yaml, .yml or .json" if allow_json else ".toml, .yaml or .yml"
        _fail(where, f"expected a {kinds} file; got suffix {path.suffix!r}")
    if not isinstance(data, dict) or not data:
        _fail(where, f"expected a table of settings; got {type(data).__name__} {data!r}")
    return data


def grid_from_file(path: str | Path, **overrides) -> Grid:
    """A grid from a TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML) sweep file.

    Keys are :func:`make_grid`'s: :class:`Grid`'s fields plus ``profile`` (an unknown key
    is refused with the closest known one); ``mechanisms`` is a list of names, groups
    (``"approximate"``, ``"subquadratic"``) or tables ``{name = "sliding_window", window =
    128}``. ``overrides`` (from flags) win. The sweeps in ``benchmarks/`` are examples.
    """
    path = Path(path)
    where = f"sweep file {path}"
    data = read_settings(path, where)
    profile = overrides.pop("profile", None) or data.pop("profile", None)
    data.pop("profile", None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return make_grid(profile=profile, where=where, **data)
