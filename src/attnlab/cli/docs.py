"""``docs/mechanisms.md``: the table of every registered mechanism, written from the registry.

Refresh it with ``attnlab info --markdown > docs/mechanisms.md``; a test regenerates it and
fails when the checked-in file is stale.
"""

from __future__ import annotations

from attnlab.bench.grid import claims_subquadratic_memory
from attnlab.registry import MechanismSpec, get, list_mechanisms

__all__ = ["REFRESH", "mechanisms_markdown"]

REFRESH = "attnlab info --markdown > docs/mechanisms.md"

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`"


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _paper(s: MechanismSpec) -> str:
    p = s.paper
    who = f"[{_cell(p.short())}]({p.url})" if p.url else _cell(p.short())
    return f"{who}: {_cell(p.title)}"


def _hparams(s: MechanismSpec) -> str:
    return ", ".join(_code(f"{h.name}={h.describe_default()}") for h in s.hparams) or "-"


def _row(s: MechanismSpec) -> list[str]:
    name = _code(s.name) + (f" (alias {', '.join(map(_code, s.aliases))})" if s.aliases else "")
    return [name, s.family, s.inputs, _paper(s), _yes(s.exact), _yes(s.causal),
            _yes(claims_subquadratic_memory(s.name)), _code(s.time), _code(s.memory),
            _hparams(s)]


_HEAD = ["name", "family", "inputs", "paper", "exact", "causal", "sub-quadratic", "time", "memory",
         "default hyperparameters"]


def mechanisms_markdown() -> str:
    """The Markdown of ``docs/mechanisms.md`` (ends with a newline)."""
    specs = [get(n) for n in list_mechanisms(inputs=None)]
    lines = [
        "# Mechanisms",
        "",
        f"Every mechanism in the registry ({len(specs)}), generated from it: do not edit "
        f"this file, refresh it with `{REFRESH}` (a test fails when it is stale). "
        "`attnlab info NAME` tells more of one: its equation, every flag, its "
        "hyperparameters' meaning, the file and line of its class, its test file and the "
        "command that benchmarks it.",
        "",
        "* exact: computes softmax attention (or its paper's score) exactly; else it "
        "approximates it.",
        "* causal: has a causal (left-to-right) form.",
        "* sub-quadratic: its memory claim has no N^2 term at fixed hyperparameters (the "
        "`subquadratic` group of `attnlab bench`, held to it by tests/test_complexity.py); "
        "its time is in the next column.",
        "* time, memory: the registry's claims (N: sequence length, D: head dimension; the "
        "other letters are hyperparameters, see `attnlab info NAME`).",
        "* default hyperparameters: what `attnlab.create(NAME)` builds (`required`: no "
        "default).",
        "",
        "| " + " | ".join(_HEAD) + " |",
        "|" + "---|" * len(_HEAD),
    ]
    lines += ["| " + " | ".join(_row(s)) + " |" for s in specs]
    return "\n".join(lines) + "\n"
