"""The bad-input audit as tests: for every mechanism and every family of cases
(tests/audit.py), and for every command-line case (tests/audit_cli.py), no call may be
silent (bad input accepted, or a wrong result) or crash (a traceback, or an error that does
not say what is wrong). ``python tests/audit.py`` and ``python tests/audit_cli.py`` print
the counts that docs/robustness.md quotes."""

from __future__ import annotations

import pytest
from audit import FAMILIES_OF_CASES, Case, run_case, tally
from audit_cli import audit as audit_cli

import attnlab


@pytest.mark.parametrize("make", FAMILIES_OF_CASES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", attnlab.list_mechanisms())
def test_no_silent_result_and_no_crash(name, make):
    outcomes = [run_case(c) for c in make(name)]
    bad = [f"{o.kind}: {o.case.id}: {o.detail}" for o in outcomes
           if o.kind in ("silent", "crash")]
    assert not bad, "\n".join(bad)


def test_the_audit_tells_a_silent_result_and_a_crash_from_a_clear_refusal():
    """The classifier itself: a refusal that names the argument is clear, one that does
    not is a crash, accepted bad input and a wrong result are silent."""
    def raise_(e):
        def f():
            raise e
        return f

    assert run_case(Case("x", "a", "refuse", raise_(ValueError("scale must be > 0")),
                         ("scale",))).kind == "clear"
    assert run_case(Case("x", "b", "refuse", raise_(ValueError("bad")), ("scale",))).kind \
        == "crash"
    assert run_case(Case("x", "c", "refuse", raise_(ZeroDivisionError()), ())).kind == "crash"
    assert run_case(Case("x", "d", "refuse", lambda: 1, ("scale",))).kind == "silent"
    assert run_case(Case("x", "e", "result", lambda: 1, check=lambda r: r == 2)).kind \
        == "silent"
    assert run_case(Case("x", "f", "result", lambda: 2, check=lambda r: r == 2)).kind \
        == "correct"
    assert sum(tally([run_case(Case("x", "g", "result", lambda: 2,
                                    check=lambda r: True))]).values()) == 1


def test_every_command_line_case_ends_in_one_clear_line(tmp_path):
    try:
        outcomes = audit_cli(tmp_path / "audit")
    finally:  # the fixtures made read-only must not stop pytest's clean-up
        for path in tmp_path.rglob("*"):
            path.chmod(0o755)
    bad = [f"{kind}: attnlab {' '.join(argv)}: {detail}" for argv, kind, detail in outcomes
           if kind != "clear"]
    assert len(outcomes) > 80 and not bad, "\n".join(bad)
