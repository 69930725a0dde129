"""The command line: list, info, demo, and errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import attnlab
from attnlab.cli.main import main


def test_list_table_has_every_mechanism(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in attnlab.list_mechanisms():
        assert name in out
    for col in ("family", "exact", "time", "memory", "causal", "masks", "cross", "paper"):
        assert col in out


def test_list_json_round_trips_the_registry(capsys):
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == attnlab.list_mechanisms(inputs=None)
    assert data == [attnlab.get(d["name"]).to_dict() for d in data]


@pytest.mark.parametrize("name", attnlab.list_mechanisms())
def test_info_shows_hparams_equation_paper(name, capsys):
    assert main(["info", name]) == 0
    out = capsys.readouterr().out
    spec = attnlab.get(name)
    assert str(spec.paper.year) in out and "equation" in out
    for h in spec.hparams:
        assert h.name in out


def test_unknown_name_is_a_clean_error(capsys):
    assert main(["info", "flsh"]) == 2
    err = capsys.readouterr().err
    assert "unknown name 'flsh'" in err and "Traceback" not in err


def test_demo_runs_every_mechanism(capsys):
    assert main(["demo", "--n", "32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(attnlab.list_mechanisms())
    for r in rows:
        assert r["finite"] and not r["error"], r
        if r["max_abs_err"] is not None and r["exact"]:
            assert r["max_abs_err"] < 1e-4, r


def test_console_script_is_installed():
    res = subprocess.run([sys.executable, "-m", "attnlab.cli.main", "list"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "reference" in res.stdout


def test_verify_checks_every_mechanism_and_reports_failures(capsys, monkeypatch):
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    for name in attnlab.list_mechanisms():
        assert name in out
    assert "FAILED" not in out
    assert main(["verify", "sdpa", "linear", "--causal", "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    # A broken mechanism turns the command red (exit 1) and names it.
    cls = attnlab.get("linear").cls
    attend = cls._attend
    monkeypatch.setattr(cls, "_attend", lambda self, *a: (attend(self, *a)[0] * 1.1, None))
    assert main(["verify", "linear"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_an_unknown_family_is_refused_with_a_close_match(capsys):
    with pytest.raises(ValueError, match=r"unknown family 'exakt'; did you mean 'exact'"):
        attnlab.list_mechanisms(family="exakt")
    assert main(["list", "--family", "exakt"]) == 2
    assert "did you mean 'exact'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--n", "--batch", "--heads", "--head-dim"])
def test_demo_sizes_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", flag, "0"])
    assert e.value.code == 2
    assert f"argument {flag}: expected an integer >= 1; got 0" in capsys.readouterr().err
