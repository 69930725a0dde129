"""The registry: metadata, lookup, hyperparameter validation."""

from __future__ import annotations

import pkgutil
import re
from pathlib import Path

import pytest
import torch

import attnlab
import attnlab.mechanisms
from attnlab.registry import HParam, Paper, register_mechanism

TESTS = Path(__file__).parent


@pytest.mark.parametrize("name", attnlab.list_mechanisms())
def test_every_mechanism_has_complete_metadata(name):
    s = attnlab.get(name)
    assert s.name == name and s.family
    assert s.paper.title and s.paper.authors and 1900 < s.paper.year < 2100
    assert re.match(r"O\(", s.time) and re.match(r"O\(", s.memory)
    assert s.equation and s.summary
    for flag in ("exact", "causal", "arbitrary_mask", "cross", "returns_weights",
                 "differentiable", "half_precision", "learnable"):
        assert isinstance(getattr(s, flag), bool)
    d = s.to_dict()
    assert d["name"] == name and {h["name"] for h in d["hparams"]} == {h.name for h in s.hparams}
    # The class registered is the one built; it is an nn.Module following the contract.
    mech = attnlab.create_for(name, head_dim=8, num_heads=2, max_seq_len=32)
    assert isinstance(mech, torch.nn.Module) and isinstance(mech, attnlab.Mechanism)
    assert type(mech).spec is s
    has_params = any(True for _ in mech.parameters())
    assert has_params == s.learnable, f"{name}: learnable flag disagrees with its parameters"


@pytest.mark.parametrize("name", attnlab.list_mechanisms())
def test_family_is_the_module_and_the_test_file(name):
    """A mechanism of family ``f`` is defined in ``attnlab.mechanisms.f`` (the module, or a
    module inside the package of that name) and tested in ``tests/test_f.py`` (or
    ``tests/f/``)."""
    s = attnlab.get(name)
    home, module = f"attnlab.mechanisms.{s.family}", s.cls.__module__
    assert module == home or module.startswith(home + "."), (
        f"{name}: family {s.family!r}, but defined in {module}, not {home}")
    assert (TESTS / f"test_{s.family}.py").is_file() or (TESTS / s.family).is_dir(), (
        f"{name}: no tests/test_{s.family}.py for its family {s.family!r}")


def test_mechanisms_holds_exactly_the_families():
    """Every module of ``attnlab.mechanisms`` but ``base`` and the ``_engines`` is a family
    of registered mechanisms, and every family has one."""
    modules = {m.name for m in pkgutil.iter_modules(attnlab.mechanisms.__path__)}
    built_in = [attnlab.get(n) for n in attnlab.list_mechanisms(inputs=None)
                if attnlab.get(n).cls.__module__.startswith("attnlab.")]  # not a test's own
    assert modules - {"base", "_engines"} == {s.family for s in built_in}
    assert not any(s.cls.__module__.startswith("attnlab.mechanisms._engines") for s in built_in)


def test_aliases_resolve_and_names_normalise():
    assert attnlab.get("naive").name == "reference"
    assert attnlab.get("Reference").name == "reference"
    assert attnlab.get("SDPA").name == "sdpa"


def test_list_filters():
    exact = attnlab.list_mechanisms(exact=True)
    assert "reference" in exact and "sdpa" in exact
    assert attnlab.list_mechanisms(family="exact") == sorted(attnlab.list_mechanisms(family="exact"))
    assert all(attnlab.get(n).causal for n in attnlab.list_mechanisms(causal=True))
    with pytest.raises(TypeError, match=r"unknown filter \['fast'\]"):
        attnlab.list_mechanisms(fast=True)


def test_hparam_validation_messages():
    with pytest.raises(TypeError, match=r"reference: unknown hyperparameter 'precison' "
                                        r"\(did you mean 'precision'\?\)"):
        attnlab.create("reference", precison="float64")
    with pytest.raises(ValueError, match=r"reference: hyperparameter 'precision' must be one of "
                                         r"\['native', 'float64'\]; got 'float32'"):
        attnlab.create("reference", precision="float32")


def test_hparam_types_and_ranges():
    h = HParam("window", int, 8, low=1)
    assert h.validate(3, "m") == 3
    with pytest.raises(ValueError, match=r"m: hyperparameter 'window' must be >= 1; got -2"):
        h.validate(-2, "m")
    with pytest.raises(TypeError, match=r"'window' must be an int; got float 2.5"):
        h.validate(2.5, "m")
    with pytest.raises(TypeError, match=r"must be an int; got bool True"):
        h.validate(True, "m")
    f = HParam("eps", float, 0.1, low=0.0, low_exclusive=True, high=1.0)
    assert f.validate(1, "m") == 1.0
    with pytest.raises(ValueError, match=r"must be > 0.0 and <= 1.0; got 0.0"):
        f.validate(0.0, "m")
    with pytest.raises(ValueError, match=r"must be finite"):
        f.validate(float("nan"), "m")
    r = HParam("head_dim", int, attnlab.registry.REQUIRED, low=1)
    with pytest.raises(ValueError, match=r"'head_dim' is required"):
        r.validate(r.default, "m")
    e = HParam("head_dim", int, 8, "split in halves", low=2, multiple_of=2)
    assert [e.validate(v, "m") for v in (2, 4, 64)] == [2, 4, 64]
    for bad in (3, 5, 63):
        with pytest.raises(ValueError, match=rf"'head_dim' must be a multiple of 2 "
                                             rf"\(split in halves\); got {bad}"):
            e.validate(bad, "m")
    with pytest.raises(ValueError, match=r"is required \(expected int >= 2, a multiple of 2\)"):
        e.validate(attnlab.registry.REQUIRED, "m")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match=r"'reference' is already registered"):
        @register_mechanism("reference", family="x", paper=Paper("t", "a", 2000), time="O(N)",
                            memory="O(N)", equation="-", exact=True, causal=False,
                            arbitrary_mask=False, cross=False, returns_weights=False)
        class Dup(attnlab.Mechanism):
            pass


def test_third_party_mechanism_registers_where_defined():
    @register_mechanism("test_mean_pool", family="test", paper=Paper("t", "a", 2000),
                        time="O(N D)", memory="O(N)", equation="mean_j v_j", exact=False,
                        causal=False, arbitrary_mask=False, cross=True, returns_weights=False,
                        hparams=[HParam("gain", float, 1.0, low=0.0)])
    class MeanPool(attnlab.Mechanism):
        """Every query gets the mean of the values (a test of the plug-in path)."""

        def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
            out = v.mean(-2, keepdim=True).expand(*q.shape[:-1], v.shape[-1])
            return out * self.hp["gain"], None

    try:
        assert "test_mean_pool" in attnlab.list_mechanisms()
        q = torch.randn(1, 2, 3, 4)
        out = attnlab.attention(q, q, q, mechanism="test_mean_pool", gain=2.0)
        torch.testing.assert_close(out, 2 * q.mean(-2, keepdim=True).expand_as(q))
        with pytest.raises(ValueError, match=r"test_mean_pool has no causal form"):
            attnlab.attention(q, q, q, mechanism="test_mean_pool", is_causal=True)
        with pytest.raises(ValueError, match=r"test_mean_pool cannot take an arbitrary attn_mask"):
            attnlab.attention(q, q, q, mechanism="test_mean_pool",
                              attn_mask=torch.ones(3, 3, dtype=torch.bool))
    finally:
        attnlab.registry._REGISTRY.pop("test_mean_pool")


def test_inputs_outside_the_contract_need_their_own_gate():
    common = dict(family="t", paper=Paper("t", "t", 2024, ""), time="O(N)", memory="O(N)",
                  equation="-", exact=True, causal=False, arbitrary_mask=False, cross=False,
                  returns_weights=False)
    with pytest.raises(ValueError, match=r"inputs must be one of \('qkv', 'graph', 'pair'\)"):
        register_mechanism("t_bad_inputs", inputs="graphs", **common)
    with pytest.raises(ValueError, match=r"inputs='graph' is outside the \(q, k, v\) contract"):
        register_mechanism("t_no_gate", inputs="graph", **common)
    with pytest.raises(ValueError, match=r"inputs: expected one of"):
        attnlab.list_mechanisms(inputs="qvk")
    every = attnlab.list_mechanisms(inputs=None)
    by_kind = [attnlab.list_mechanisms(inputs=k) for k in ("qkv", "graph", "pair")]
    assert sorted(sum(by_kind, [])) == every and attnlab.list_mechanisms() == by_kind[0]
    assert all(attnlab.get(n).limit.gate is not None for n in by_kind[1] + by_kind[2])
