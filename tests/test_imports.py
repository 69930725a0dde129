"""The house's layers: every import of attnlab's own modules goes down, none is hidden in a
function, there is no circle, and every module imports on its own.

Layers, bottom to top (the developers' guide); a module may import its own layer or below:

    util, files, stats, flops, version
    data, registry, contract, numpy_reference
    functional, verify, nn
    mechanisms, models
    bench -> train -> tasks -> compare -> report -> cli

``attnlab/__init__.py`` is the package's facade: it imports the layers up to ``tasks``,
and only ``cli`` may import it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "attnlab"
LAYERS = [("util", "files", "stats", "flops", "version"),
          ("data", "registry", "contract", "numpy_reference"),
          ("functional", "verify", "nn"),
          ("mechanisms", "models"),
          ("bench",), ("train",), ("tasks",), ("compare",), ("report",),
          ("cli", "__main__")]  # python -m attnlab: the command line
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(module, line, in_function)`` for every import of an attnlab module in ``path``,
    except those under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    tree = ast.parse(path.read_text())
    out: list[tuple[str, int, bool]] = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module \
                    and child.module.split(".")[0] == "attnlab":
                for alias in child.names:  # `from attnlab.x import y`: y may be a module
                    sub = f"{child.module}.{alias.name}"
                    out.append((sub if sub in MODULES else child.module, child.lineno, inner))
            elif isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, inner) for a in child.names
                           if a.name.split(".")[0] == "attnlab")
            visit(child, inner)

    visit(tree, False)
    return out


def _rank(module: str) -> int | None:
    parts = module.split(".")
    return RANK.get(parts[1]) if len(parts) > 1 else RANK["cli"]  # the facade: cli only


def test_every_module_has_a_layer():
    missing = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(RANK))
    assert not missing, f"add these to LAYERS in {__file__}: {missing}"


def test_imports_only_go_down():
    bad = []
    for name, path in MODULES.items():
        here = _rank(name)
        for target, line, _ in _imports(path):
            there = _rank(target)
            if name == "attnlab":
                continue  # the facade imports every layer
            if here is not None and there is not None and there > here:
                bad.append(f"{name}:{line} ({LAYERS[here][0]} layer) imports {target} "
                           f"({LAYERS[there][0]} layer, above it)")
    assert not bad, "\n".join(bad)


def test_no_attnlab_import_inside_a_function():
    # A function-local import hides what a module depends on (and hid three circles).
    bad = [f"{name}:{line} imports {target} inside a function"
           for name, path in MODULES.items() for target, line, inner in _imports(path)
           if inner]
    assert not bad, "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    return {name: {t for t, _, _ in _imports(path) if t != name and t != "attnlab"}
            for name, path in MODULES.items() if name != "attnlab"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := dfs(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    # A package's __init__ importing its modules counts: a module importing its own
    # package (to have the others registered) closes a circle through it.
    found = _cycle(_graph())
    assert found is None, "import circle: " + " -> ".join(found)


def test_every_module_imports_in_a_fresh_interpreter():
    # Importing any attnlab module runs the facade (attnlab/__init__.py) first, which
    # imports the layers up to tasks: one fresh interpreter that imports every module in
    # turn is what each of them alone would see, plus the modules the facade leaves out.
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    names = [m for m in MODULES if m != "attnlab.__main__"]
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# Function-local imports are for optional packages only (the house rule): what the core
# install has (torch, numpy, rich, the standard library) is imported at the top. A torch
# module that needs an optional package is optional itself.
OPTIONAL_TORCH = {"torch.utils.tensorboard"}  # needs tensorboard (the viz extra)


def local_core_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of a core module inside a function of ``tree``."""
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            found += [(node.lineno, m) for m in mods
                      if (m.split(".")[0] in ("torch", "numpy", "rich")
                          or m.split(".")[0] in sys.stdlib_module_names)
                      and m not in OPTIONAL_TORCH]
    return sorted(set(found))


def test_core_modules_are_imported_at_the_top():
    bad = [f"{name}:{line} imports {m} inside a function"
           for name, path in MODULES.items()
           for line, m in local_core_imports(ast.parse(path.read_text(encoding="utf-8")))]
    assert not bad, "\n".join(bad)


def test_the_rule_sees_a_local_core_import():
    code = ("import torch\n\ndef f():\n    from torch.utils.benchmark import Timer\n"
            "    import json\n    from torch.utils.tensorboard import SummaryWriter\n"
            "    import tokenizers\n")
    assert local_core_imports(ast.parse(code)) == [(4, "torch.utils.benchmark"), (5, "json")]
