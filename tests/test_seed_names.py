"""The 23 names of the project attnlab replaces: each resolves to what implements it, and
what the table names exists (mechanisms registered, options accepted, tasks registered)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

import attnlab
from attnlab.cli.main import main
from attnlab.cli.seed_names import SEED_NAMES, find_seed_name, seed_key, seed_names_markdown
from attnlab.nn import MultiheadAttention
from attnlab.train.regimes import list_regimes
from attnlab.train.task import list_tasks

OLD_PROJECT = ("multi-head", "adaptive", "local", "global", "hierarchical", "cross", "self",
               "sparse (top-k)", "convolutional", "gated", "adversarial", "graph", "hard",
               "soft", "Transformer-XL", "BERT bidirectional", "hybrid", "co-attention",
               "axial", "frequency-domain", "distillation", "pooling", "memory-augmented")


def test_every_name_of_the_old_project_has_one_row():
    assert len(SEED_NAMES) == 23 == len({seed_key(r.name) for r in SEED_NAMES})
    for name in OLD_PROJECT:
        assert find_seed_name(name) is not None, name
    assert find_seed_name("Frequency domain").mechanisms == ("fnet", "global_filter")
    assert find_seed_name("Sparse").name == "Sparse (top-k)"
    assert find_seed_name("no such attention") is None


def test_what_the_table_names_exists():
    registered = set(attnlab.list_mechanisms(inputs=None))
    layer_options = set(inspect.signature(MultiheadAttention.__init__).parameters)
    tasks = set(list_tasks())
    regimes = set(list_regimes())
    for row in SEED_NAMES:
        assert set(row.mechanisms) <= registered, (row.name, row.mechanisms)
        assert row.kind in ("mechanism", "option", "model", "contract", "regime")
        # every regime row names a registered regime, and nothing is left "planned"
        assert not row.planned, row.name
        if row.kind == "regime":
            assert set(re.findall(r"--regime (\w+)", row.how)) & regimes, row.name
        for regime in re.findall(r"--regime (\w+)", row.how):
            assert regime in regimes, (row.name, regime)
        for opt in re.findall(r"MultiheadAttention\([^)]*?(\w+)=", row.how):
            assert opt in layer_options, (row.name, opt)
        for task in re.findall(r"--task (\w+)", row.how):
            assert task in tasks, (row.name, task)


@pytest.mark.parametrize("name", ["frequency-domain", "Memory augmented", "sparse (TOP-K)"])
def test_attnlab_info_resolves_a_seed_name(name, capsys):
    assert main(["info", name, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["seed_name"] == find_seed_name(name).name and row["mechanisms"]


def test_a_registered_name_wins_over_a_seed_name(capsys):
    assert main(["info", "hard", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "hard"


def test_docs_zoo_holds_the_current_table():
    zoo = (Path(__file__).resolve().parents[1] / "docs" / "zoo.md").read_text()
    assert seed_names_markdown() in zoo, "refresh the table of docs/zoo.md from " \
        "attnlab.cli.seed_names.seed_names_markdown()"


def test_list_seed_names_prints_every_row(capsys):
    assert main(["list", "--seed-names"]) == 0
    out = capsys.readouterr().out
    assert all(row.name.split(" ")[0] in out for row in SEED_NAMES)
