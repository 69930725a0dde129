"""``attnlab info NAME``: one mechanism, and where everything about it is.

Besides what the registry says (equation, complexity, flags, hyperparameters, paper), it
prints the file and line of the mechanism's class, its test file (``tests/test_<family>.py``:
one file per family, in ``src/attnlab/mechanisms/`` and in ``tests/``) and the command that
benchmarks it. ``attnlab info --markdown`` prints the table of every mechanism that is
checked in as ``docs/mechanisms.md`` (:mod:`attnlab.cli.docs`).
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import attnlab
from attnlab.cli.docs import mechanisms_markdown
from attnlab.cli.seed_names import SEED_NAMES, SeedName, find_seed_name
from attnlab.registry import MechanismSpec, get, resolve_name

__all__ = ["add_parser", "bench_command", "cmd_info", "repo_root", "seed_names_table",
           "source_location", "test_file"]

# src/attnlab/__init__.py -> the checkout's root (src layout); an installed wheel has none
_PACKAGE_DIR = Path(attnlab.__file__).resolve().parent


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def repo_root() -> Path | None:
    """The source checkout holding this package (``src/attnlab`` under a directory with
    ``pyproject.toml`` and ``tests/``), or None for an installed copy."""
    root = _PACKAGE_DIR.parent.parent
    if _PACKAGE_DIR.parent.name == "src" and (root / "pyproject.toml").is_file() \
            and (root / "tests").is_dir():
        return root
    return None


def _shown(path: Path) -> str:
    """``path`` relative to the checkout (``src/attnlab/...``), else to the package's
    parent (``attnlab/...`` in site-packages), else as it is."""
    root = repo_root()
    for base in ((root,) if root else ()) + (_PACKAGE_DIR.parent,):
        if path.is_relative_to(base):
            return path.relative_to(base).as_posix()
    return str(path)


def source_location(cls: type) -> tuple[str, int]:
    """``(file, line)`` of the ``class`` statement of ``cls`` (below its decorators)."""
    path = Path(inspect.getsourcefile(cls) or inspect.getfile(cls)).resolve()
    lines, start = inspect.getsourcelines(cls)
    offset = next((i for i, line in enumerate(lines) if line.lstrip().startswith("class ")),
                  0)
    return _shown(path), start + offset


def test_file(family: str) -> tuple[str, bool]:
    """``(tests/test_<family>.py, whether it exists)``: whether is False outside a source
    checkout, where the tests are not installed."""
    rel = f"tests/test_{family}.py"
    root = repo_root()
    return rel, root is not None and (root / rel).is_file()


def bench_command(name: str) -> str:
    """The command that benchmarks ``name`` alone, forward and backward, at 1K and 4K."""
    return f"attnlab bench run --mechanisms {name} --n 1024 4096 --pass both"


def _where(console: Console, s: MechanismSpec) -> None:
    path, line = source_location(s.cls)
    console.print(f"\n[bold]class[/bold]  {escape(s.cls.__name__)} in {escape(path)}:{line}")
    tests, found = test_file(s.family)
    if found:
        console.print(f"[bold]tests[/bold]  {escape(tests)}")
    elif repo_root() is not None:
        console.print(f"[bold]tests[/bold]  none yet: the {escape(s.family)} family's would be "
                      f"{escape(tests)}")
    else:
        console.print(f"[bold]tests[/bold]  {escape(tests)} in a source checkout (tests are "
                      f"not installed with the package)")
    if s.inputs == "qkv":
        console.print(f"[bold]bench[/bold]  {escape(bench_command(s.name))}")
    else:  # the benchmark lab times (q, k, v) calls; this one is measured in its task
        console.print(f"[bold]bench[/bold]  none by name: it takes {s.inputs} inputs, not the "
                      f"(q, k, v) contract; its task's table has its time per step")


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    if args.markdown:
        if args.name is not None:
            raise ValueError(f"info: give NAME or --markdown (every mechanism), not both; "
                             f"got NAME {args.name!r} and --markdown")
        print(mechanisms_markdown(), end="")
        return 0
    if args.name is None:
        raise ValueError("info: expected a mechanism NAME (see `attnlab list`) or "
                         "--markdown; got neither")
    row = _seed_row(args.name)
    if row is not None:
        return _print_seed_row(console, row, args.json)
    s = get(args.name)
    if args.json:
        print(json.dumps(s.to_dict(), indent=2))
        return 0
    console.print(f"[bold]{s.name}[/bold]  ({s.family}, {'exact' if s.exact else 'approximate'})")
    if s.aliases:
        console.print(f"aliases: {', '.join(s.aliases)}")
    console.print(escape(s.summary))
    console.print(f"\n[bold]equation[/bold]  {escape(s.equation)}")
    console.print(f"[bold]time[/bold] {escape(s.time)}   [bold]memory[/bold] {escape(s.memory)}")
    flags = {"causal": s.causal, "arbitrary masks": s.arbitrary_mask,
             "key padding": s.key_padding, "cross (Nq != Nk)": s.cross,
             "returns weights": s.returns_weights, "kv cache": s.kv_cache,
             "differentiable": s.differentiable, "float16/bfloat16": s.half_precision,
             "learnable parameters": s.learnable}
    console.print("  ".join(f"{k}: {_yes(v)}" for k, v in flags.items()))
    p = s.paper
    console.print(f"\n[bold]paper[/bold]  {escape(p.title)}. {escape(p.authors)} ({p.year}). "
                  f"{escape(p.url) or '(no link)'}")
    _where(console, s)
    if not s.hparams:
        console.print("hyperparameters: none")
        return 0
    table = Table(title="hyperparameters")
    for col in ("name", "type", "default", "description"):
        table.add_column(col)
    for h in s.hparams:
        table.add_row(h.name, h.type.__name__, escape(h.describe_default()), escape(h.doc))
    console.print(table)
    return 0


def _seed_row(name: str) -> SeedName | None:
    """The seed-name row for ``name`` when it is not a registered name or alias (a
    registered name wins: "hard", "local", "axial" are both)."""
    try:
        resolve_name(name)
        return None
    except ValueError:
        return find_seed_name(name)


def _print_seed_row(console: Console, row: SeedName, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"seed_name": row.name, "kind": row.kind,
                          "mechanisms": list(row.mechanisms), "how": row.how,
                          "planned": row.planned or None}, indent=2))
        return 0
    console.print(f"[bold]{escape(row.name)}[/bold]: a name of the comparison project "
                  f"attnlab replaces ({row.kind})")
    if row.planned:
        console.print(f"not implemented yet: planned in {escape(row.planned)}")
    console.print(escape(row.how))
    for n in row.mechanisms:
        s = get(n)
        console.print(f"  [bold]{s.name}[/bold]  {escape(s.equation)}  ({escape(s.paper.short())})")
    if row.mechanisms:
        console.print(f"more: attnlab info {row.mechanisms[0]}")
    return 0


def seed_names_table() -> Table:
    """The 23 names of the old project and what implements each (attnlab list --seed-names)."""
    table = Table(title="the 23 attention names of the comparison project attnlab replaces")
    for col in ("name", "kind", "mechanisms", "how / where"):
        table.add_column(col, overflow="fold")
    for row in SEED_NAMES:
        table.add_row(row.name, row.kind, ", ".join(row.mechanisms) or "-",
                      f"not yet: {row.planned}" if row.planned else row.how)
    return table


def add_parser(sub) -> None:
    pi = sub.add_parser("info", help="one mechanism: equation, paper, hyperparameters, its "
                                     "file, tests and bench command",
                        description="One mechanism: what the registry says of it (equation, "
                                    "complexity, flags, hyperparameters, paper), where its "
                                    "class and tests are, and how to benchmark it. With "
                                    "--markdown: the table of every mechanism "
                                    "(docs/mechanisms.md).")
    pi.add_argument("name", nargs="?", help="a registered name or alias (see attnlab list), "
                                            "or a name of attnlab list --seed-names")
    pi.add_argument("--json", action="store_true", help="the registry entry as JSON")
    pi.add_argument("--markdown", action="store_true",
                    help="print docs/mechanisms.md, the table of every mechanism; refresh "
                         "it with: attnlab info --markdown > docs/mechanisms.md")
