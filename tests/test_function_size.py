"""The house rule "no function over ~60 lines", held: a function's code (its docstring
aside, which carries the paper's equation and the contract) fits in 60 lines. A longer
one is split where it does two things, not squeezed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "attnlab"
LIMIT = 60


def long_functions(tree: ast.AST, limit: int = LIMIT) -> list[tuple[str, int, int]]:
    """(name, line, code lines) of every function whose body past its docstring is longer
    than ``limit`` lines."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            body = body[1:]
        if body and (n := body[-1].end_lineno - body[0].lineno + 1) > limit:
            out.append((node.name, node.lineno, n))
    return out


def test_no_function_is_longer_than_the_limit():
    bad = [f"{path.relative_to(SRC.parent)}:{line} {name}: {n} lines of code"
           for path in sorted(SRC.rglob("*.py"))
           for name, line, n in long_functions(ast.parse(path.read_text(encoding="utf-8")))]
    assert not bad, f"functions over {LIMIT} lines (split them):\n" + "\n".join(bad)


@pytest.mark.parametrize("lines, doc, long", [(60, False, False), (61, False, True),
                                              (60, True, False)])
def test_the_count_skips_the_docstring_only(lines, doc, long):
    docstring = '    """' + "\n" * 30 + '    """\n' if doc else ""
    code = "def f():\n" + docstring + "    x = 1\n" * lines
    assert bool(long_functions(ast.parse(code))) == long
