"""Every third-party module that attnlab's code imports is declared in pyproject.toml.

The source is read with ``ast`` (nothing is imported): every ``import x`` and
``from x import y``, at any depth (a function-local import of an optional package counts
the same), plus ``importlib.import_module("x")`` and ``optional_import("x", ...)`` with a literal
name. Each top-level name
that is neither standard library nor attnlab is mapped to its distribution and must be a
core dependency or in some extra. Some needs show in no import of their own: those are in
``IMPLIED`` (``torch.utils.tensorboard`` needs ``tensorboard``; pandas' ``to_parquet``
needs ``pyarrow``).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a core dependency there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "attnlab"

# Import name -> distribution, for packages that may not be installed here (where one is,
# importlib.metadata.packages_distributions() is asked first).
DISTRIBUTIONS = {
    "sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow",
    "performer_pytorch": "performer-pytorch", "nystrom_attention": "nystrom-attention",
    "local_attention": "local-attention", "reformer_pytorch": "reformer-pytorch",
    "faiss": "faiss-cpu",
}
# A dotted import, or an attribute called (``.name(``), that needs a distribution which
# the code never imports by its own name.
IMPLIED = {
    "torch.utils.tensorboard": "tensorboard",
    "to_parquet": "pyarrow", "read_parquet": "pyarrow",
}


def _normal(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _module_names(tree: ast.AST) -> set[str]:
    """Every absolute module named in an import (dotted, as written), and the literal
    names given to importlib.import_module / __import__."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) in ("import_module", "optional_import")
                   or getattr(node.func, "id", None) in ("__import__", "import_module",
                                                         "optional_import"))):
            names.add(node.args[0].value)
    return names


def _called_attributes(tree: ast.AST) -> set[str]:
    return {node.func.attr for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}


def needed_distributions(src: Path) -> dict[str, set[str]]:
    """{distribution (normalised): the files needing it} for every .py under ``src``."""
    installed = importlib.metadata.packages_distributions()
    need: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names = _module_names(tree)
        found = set()
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "attnlab":
                continue
            dists = installed.get(top) or [DISTRIBUTIONS.get(top, top)]
            found.add("|".join(sorted({_normal(d) for d in dists})))
        found |= {_normal(d) for key, d in IMPLIED.items()
                  if key in names or key in _called_attributes(tree)}
        for dist in found:
            need.setdefault(dist, set()).add(str(path.relative_to(src.parent)))
    return need


def declared(pyproject: Path) -> dict[str, str]:
    """{distribution (normalised): where it is declared ('core' or 'extra NAME')}."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    out = {_normal(Requirement(r).name): "core" for r in project.get("dependencies", [])}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        for r in reqs:
            out.setdefault(_normal(Requirement(r).name), f"extra {extra}")
    return out


def undeclared(src: Path, pyproject: Path) -> dict[str, list[str]]:
    """{distribution: files} for every need that pyproject.toml does not declare (a name
    that several installed distributions provide is declared if one of them is)."""
    have = declared(pyproject)
    return {dist: sorted(files) for dist, files in sorted(needed_distributions(src).items())
            if not any(d in have for d in dist.split("|"))}


def test_every_imported_package_is_declared():
    missing = undeclared(SRC, ROOT / "pyproject.toml")
    assert missing == {}, (
        "imported by attnlab but in no [project] dependencies nor any extra of "
        f"pyproject.toml: {missing}; declare each (an extra for an optional one), or map "
        "its import name in DISTRIBUTIONS / IMPLIED here if the name differs")


def test_the_scan_finds_what_it_must():
    need = needed_distributions(SRC)
    for dist in ("torch", "numpy", "rich", "matplotlib", "scipy", "pandas", "scikit-learn",
                 "datasets", "tensorboard", "pyarrow", "playwright"):
        assert dist in need, (dist, sorted(need))
    assert need["playwright"] == {"attnlab/report/browser.py"}


@pytest.mark.parametrize("code, dist", [
    ("import foo_undeclared_attnlab\n", "foo-undeclared-attnlab"),
    ("def f():\n    from foo_undeclared_attnlab.sub import x\n", "foo-undeclared-attnlab"),
    ("import importlib\nimportlib.import_module('foo_undeclared_attnlab')\n",
     "foo-undeclared-attnlab"),
    ("import yaml\n", "pyyaml"),  # the import name is not the distribution's
    ("from torch.utils.tensorboard import SummaryWriter\n", "tensorboard"),
    ("def f(df, p):\n    df.to_parquet(p)\n", "pyarrow"),
])
def test_an_undeclared_import_fails_the_check(tmp_path, code, dist):
    """A package with one module and a pyproject declaring only torch: the check fails,
    naming the distribution and the file."""
    pkg = tmp_path / "src" / "attnlab"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import os\nfrom attnlab import x\nfrom . import y\n")
    (pkg / "mod.py").write_text(code)
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "t"\nversion = "0"\ndependencies = ["torch>=2"]\n')
    assert undeclared(pkg, tmp_path / "pyproject.toml") == {dist: ["attnlab/mod.py"]}
    (tmp_path / "pyproject.toml").write_text(
        f'[project]\nname = "t"\nversion = "0"\ndependencies = ["torch>=2"]\n'
        f'[project.optional-dependencies]\nsome = ["{dist.upper()}>=1"]\n')
    assert undeclared(pkg, tmp_path / "pyproject.toml") == {}


def test_ci_installs_the_extras_the_tests_need():
    """The browser, TensorBoard and parquet tests run in CI: .ci/run installs their extras."""
    have = declared(ROOT / "pyproject.toml")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    extras = re.search(r'pip install -e "\.\[([\w,-]+)\]"', ci)
    assert extras, "no pip install -e \".[...]\" line in .ci/run"
    installed = set(extras.group(1).split(","))
    for dist in ("playwright", "tensorboard", "pyarrow", "matplotlib", "pytest"):
        where = have[dist]
        assert where == "core" or where.removeprefix("extra ") in installed, (dist, where)


def _optional_imports(src: Path) -> list[tuple[str, str, str | None, str]]:
    """(module, extra, dist, file) of every ``optional_import`` call under ``src``."""
    calls = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "optional_import"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                kw = {k.arg: k.value.value for k in node.keywords
                      if isinstance(k.value, ast.Constant)}
                calls.append((node.args[0].value, kw.get("extra"), kw.get("dist"),
                              str(path.relative_to(src.parent))))
    return calls


def test_every_optional_import_names_the_extra_that_installs_it():
    """optional_import's hint, pip install -e ".[extra]", installs the package it names."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"]["optional-dependencies"]
    members = {e: {_normal(Requirement(r).name) for r in reqs} for e, reqs in extras.items()}
    calls = _optional_imports(SRC)
    assert len(calls) >= 12 and {c[0] for c in calls} >= {"scipy.stats", "matplotlib",
                                                           "tokenizers", "sacrebleu"}
    for module, extra, dist, where in calls:
        top = module.split(".")[0]
        dist = _normal(dist or DISTRIBUTIONS.get(top, top))
        assert extra in members, f"{where}: optional_import({module!r}) names no extra {extra!r}"
        assert dist in members[extra], (f"{where}: optional_import({module!r}) says extra "
                                        f"{extra!r}, which does not declare {dist!r}")


def test_optional_import_returns_the_module_or_says_what_to_install(monkeypatch):
    import json

    from attnlab.util.optional import optional_import

    assert optional_import("json", extra="x", purpose="p") is json
    with pytest.raises(ImportError, match=r'^reading X needs `no-such-dist`, which is not '
                                          r'installed \(.*\); install it with pip install -e '
                                          r'"\.\[data\]" \(or pip install no-such-dist\)$'):
        optional_import("no_such_module_attnlab.sub", extra="data", dist="no-such-dist",
                        purpose="reading X")

    class Refused(Exception):
        pass

    import email.mime  # a submodule already imported: its package's absence still shows
    monkeypatch.setitem(sys.modules, "email", None)
    with pytest.raises(Refused, match=r"^p needs `email`"):
        optional_import("email.mime", extra="x", purpose="p", error=Refused)
    assert email.mime
