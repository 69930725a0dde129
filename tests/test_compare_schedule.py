"""The order in which a comparison trains its runs: slowest first, by its own sweep."""

from __future__ import annotations

from attnlab.bench.store import Store
from attnlab.compare.plan import make_plan
from attnlab.compare.run import _longest_first


def _sweep(db, times: dict[tuple[str, int], float], pass_: str = "fwd+bwd") -> int:
    with Store(db) as store:
        run = store.new_run(grid={}, digest="d", machine={}, fingerprint="f", versions={},
                            commit=None, command="", profile=None, points_total=len(times))
        for (m, n), t in times.items():
            store.add(run, f"{m}-{n}", {"mechanism": m, "label": m, "N": n, "batch": 1,
                                        "heads": 1, "head_dim": 8, "dtype": "float32",
                                        "pass_": pass_, "causal": True, "device": "cpu",
                                        "status": "ok", "time_s": t})
    return run


def _plan(**task_kwargs):
    return make_plan(task="mqar", mechanisms=["sdpa", "linear", "reformer"], seeds=[0, 1],
                     max_steps=4, task_kwargs=task_kwargs)


def test_slowest_mechanism_first_at_the_nearest_length(tmp_path):
    # At N=512 (nearest the task's 500 tokens) reformer is slowest and linear fastest; at
    # 4096 the order differs, so a wrong length would give another order.
    run = _sweep(tmp_path / "r.db", {("sdpa", 512): 2.0, ("linear", 512): 1.0,
                                     ("reformer", 512): 3.0, ("sdpa", 4096): 9.0,
                                     ("linear", 4096): 1.0, ("reformer", 4096): 5.0})
    plan = _plan(length=500, num_pairs=1, num_queries=1, vocab=16, bound_pairs=True)
    todo = [(m, s) for m in ("sdpa", "linear", "reformer") for s in (0, 1)]
    got = _longest_first(todo, plan, tmp_path / "r.db", run)
    assert got == [("reformer", 0), ("reformer", 1), ("sdpa", 0), ("sdpa", 1),
                   ("linear", 0), ("linear", 1)]
    assert sorted(got) == sorted(todo)  # nothing lost, nothing repeated


def test_order_kept_without_a_usable_sweep(tmp_path):
    plan = _plan()
    todo = [("sdpa", 0), ("linear", 0), ("reformer", 0)]
    assert _longest_first(todo, plan, tmp_path / "missing.db", 1) == todo
    assert _longest_first(todo, plan, tmp_path / "missing.db", None) == todo
    run = _sweep(tmp_path / "fwd.db", {("linear", 256): 5.0}, pass_="fwd")
    assert _longest_first(todo, plan, tmp_path / "fwd.db", run) == todo
