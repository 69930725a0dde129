"""The generation benchmark (attnlab.bench.generation, ``attnlab bench generate``): each
point decodes in its own process, its figures are what decoding holds (a KV cache of
exactly 2 T E floats, or a state that does not grow), and rows reach the database."""

from __future__ import annotations

import pytest

import attnlab
from attnlab.bench.generation import measure_generation, run_generation
from attnlab.bench.store import Store
from attnlab.cli.main import main

E, H, NEW = 32, 4, 8


def test_kv_cache_holds_every_key_and_value_of_the_sequence():
    for prompt in (16, 48):
        row = measure_generation("sdpa", prompt_len=prompt, new_tokens=NEW, embed_dim=E,
                                 num_heads=H, threads=1)
        assert row["status"] == "ok" and row["tokens_per_s"] > 0
        assert row["cache_bytes"] == 2 * (prompt + NEW) * E * 4  # k and v, float32
        assert row["first_ms"] > 0 and row["last_ms"] > 0


def test_a_bounded_state_does_not_grow_with_the_prompt():
    assert "linear" in attnlab.list_mechanisms(decode_state=True)
    sizes = {p: measure_generation("linear", prompt_len=p, new_tokens=NEW, embed_dim=E,
                                   num_heads=H, threads=1)["cache_bytes"] for p in (16, 160)}
    assert sizes[16] == sizes[160] > 0


def test_points_run_in_child_processes_and_are_stored(tmp_path):
    db = tmp_path / "gen.db"
    with Store(db) as store:
        rows = run_generation(["sdpa", {"name": "flash", "block_q": 8, "block_k": 8}],
                              [16, 32], new_tokens=NEW, embed_dim=E, num_heads=H,
                              threads=1, store=store)
        stored = store.generations()
    assert [(r["mechanism"], r["prompt_len"]) for r in rows] == [
        ("sdpa", 16), ("sdpa", 32), ("flash", 16), ("flash", 32)]
    assert all(r["status"] == "ok" and r["kind"] == "kv_cache" for r in rows)
    assert [r["cache_bytes"] for r in stored] == [r["cache_bytes"] for r in rows]
    assert stored[2]["hparams"] == {"block_q": 8, "block_k": 8}
    assert main(["bench", "generations", "--db", str(db), "--markdown"]) == 0


def test_a_mechanism_that_cannot_decode_is_refused_by_name():
    with pytest.raises(ValueError, match="linformer.*neither a KV cache nor a bounded state"):
        run_generation(["linformer"], [16])
    with pytest.raises(ValueError, match="new_tokens"):
        run_generation(["sdpa"], [16], new_tokens=0)
