"""Every task trains (loss falls) with several mechanisms and baselines; real-data tasks
load the files in ../shared/datasets (skipped when absent); the CLI drives it all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from corpora import write_wikitext

from attnlab.cli.main import main
from attnlab.tasks import get_task, list_tasks
from attnlab.train.config import ConfigError
from attnlab.train.loop import load_trained, train

pytestmark = pytest.mark.usefixtures("one_thread")
SHARED = Path(os.environ.get("ATTNLAB_TEST_DATA",
                             Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no datasets at {SHARED}")
SMALL = {"d_model": 32, "num_heads": 2, "num_layers": 1}


def history(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(tmp_path, name, *, steps=30, model="transformer", mechanism="sdpa", mkw=None,
        model_kwargs=None, lr=3e-3, **task_kwargs):
    cfg = get_task(name).make_config(
        max_steps=steps, eval_every=steps // 2, warmup_steps=2, batch_size=16, lr=lr,
        model=model, mechanism=mechanism, mechanism_kwargs=mkw or {},
        model_kwargs=SMALL if model_kwargs is None else model_kwargs, task_kwargs=task_kwargs,
        eval_batches=4)
    return train(cfg, tmp_path / f"{name}-{model}-{mechanism}", progress=False)


def test_registry_lists_every_task_with_valid_defaults():
    names = list_tasks()
    for want in ("emotions", "imdb", "text_bytes", "listops", "wikitext2", "mqar", "copy",
                 "selective_copy", "seq2seq", "inpaint_digits", "inpaint_mnist",
                 "inpaint_fashion"):
        assert want in names
    for n in names:
        t = get_task(n)
        cfg = t.make_config()
        assert cfg.task == n and cfg.model == t.models[0]


TINY_LISTOPS = {"n_train": 256, "n_validation": 64, "n_test": 64, "min_length": 8,
                "max_len": 48, "max_depth": 3}
TRAINS = [
    ("copy", "transformer", "sdpa", None, {"n_train": 512, "length": 6}),
    ("mqar", "transformer", "linear", None, {"n_train": 512, "num_pairs": 4, "num_queries": 2,
                                             "vocab": 16}),
    ("selective_copy", "transformer", "sliding_window", {"window": 8},
     {"n_train": 512, "length": 12, "num_tokens": 3}),
    ("listops", "transformer", "sdpa", None, TINY_LISTOPS),
    ("listops", "transformer", "performer", None, TINY_LISTOPS),  # padded: key padding
    ("listops", "lstm", "sdpa", None, TINY_LISTOPS),
    ("seq2seq", "transformer", "sdpa", None, {"n_train": 512, "max_len": 6, "task": "copy"}),
    ("inpaint_digits", "transformer", "sdpa", None, {"n_train": 256}),
    ("inpaint_digits", "transformer", "nystromformer", {"num_landmarks": 4}, {"n_train": 256}),
    ("inpaint_digits", "unet", "sdpa", None, {"n_train": 256}),
]


@pytest.mark.parametrize("task, model, mechanism, mkw, kw", TRAINS,
                         ids=[f"{t}-{m}-{x}" for t, m, x, _, _ in TRAINS])
def test_task_trains_and_loss_falls(tmp_path, task, model, mechanism, mkw, kw):
    pytest.importorskip("sklearn") if task.startswith("inpaint_digits") else None
    mk = {} if model == "unet" else ({"d_model": 32, "hidden": 32} if model == "lstm"
                                     else SMALL)
    r = run(tmp_path, task, model=model, mechanism=mechanism, mkw=mkw, model_kwargs=mk, **kw)
    rows = history(r.run_dir)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    metric = get_task(task).metric
    pick = max if get_task(task).mode == "max" else min
    best = pick(row[f"val_{metric}"] for row in rows)
    assert metric in r.test and r.summary["best_validation"][metric] == pytest.approx(best)


def test_listops_never_truncates_and_cls_fits(tmp_path):
    r = run(tmp_path, "listops", steps=2, pooling="cls", **TINY_LISTOPS)
    data = json.loads((r.run_dir / "data.json").read_text())
    assert data["truncated"] == {"train": 0, "validation": 0, "test": 0}


def test_inpaint_cli_writes_a_figure(tmp_path):
    pytest.importorskip("sklearn")
    matplotlib = pytest.importorskip("matplotlib")
    image = pytest.importorskip("matplotlib.image")
    r = run(tmp_path, "inpaint_digits", steps=4, n_train=64)
    out = tmp_path / "fig.png"
    backend = matplotlib.get_backend()
    assert main(["inpaint", str(r.run_dir), "--n", "4", "--out", str(out)]) == 0
    assert matplotlib.get_backend() == backend  # a Figure on Agg: a notebook's is left alone
    # 3 rows (original, masked, inpainted) of 4 images: 1.3 x 4 by 4.2 inches at 120 dpi
    assert image.imread(out).shape[:2] == (504, 624)


def test_cli_train_tasks_and_errors(tmp_path, capsys):
    assert main(["tasks"]) == 0
    assert "listops" in capsys.readouterr().out
    args = ["train", "--task", "copy", "--max-steps", "4", "--seeds", "0", "1", "--no-progress",
            "--run-dir", str(tmp_path / "c"), "--task-opt", "n_train=64", "--task-opt",
            "length=4", "--model-opt", "d_model=16", "--model-opt", "num_heads=2",
            "--set", "eval_every=2", "--db", str(tmp_path / "r.db")]
    assert main(args) == 0
    agg = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert agg["seeds"] == [0, 1] and "accuracy" in agg["test"]
    assert main(args + ["--resume"]) == 0           # finished seeds are kept
    assert main(args) == 2                          # the directory holds a run
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--task", "copi"]) == 2
    assert "did you mean 'copy'" in capsys.readouterr().err
    assert main(["train", "--task", "copy", "--task-opt", "lenght=3"]) == 2
    assert "did you mean 'length'" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "c" / "seed-0")]) == 2
    assert "needs a language model run" in capsys.readouterr().err


def test_unknown_model_option_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'd_model'"):
        run(tmp_path, "copy", steps=2, model_kwargs={"dmodel": 8}, n_train=32)


# ---- real files (../shared/datasets) -------------------------------------------------------
@needs_shared
def test_emotions_on_the_real_files(tmp_path):
    r = run(tmp_path, "emotions", steps=6, data_dir=str(SHARED), max_len=32)
    data = json.loads((r.run_dir / "data.json").read_text())
    assert data["sizes"]["validation"] == 2000 and data["sizes"]["test"] == 2000
    assert data["classes"] == ["sadness", "joy", "love", "anger", "fear", "surprise"]
    # the tokenizer is saved with the run and reloads to the same model
    task, model = load_trained(r.run_dir)
    assert task.tokenizer.vocab_size == data["vocab_size"]


def test_wikitext2_layout_trains_and_generates(tmp_path, capsys):
    """Files in WikiText-2's layout (" = Title = " headings, one <eos> per line)."""
    from attnlab.data.text import wikitext_words
    words = "the game was played in the city of york and the team won".split()
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        lines = [" = Heading = \n", " \n"] + [
            " " + " ".join(words[(i + j) % len(words)] for j in range(9)) + " \n"
            for i in range(n)]
        (tmp_path / f"wiki.{split}.tokens").write_text("".join(lines))
    r = run(tmp_path, "wikitext2", steps=20, data_dir=str(tmp_path), max_len=16, lr=1e-2,
            tokenizer="word", vocab_size=None)
    data = json.loads((r.run_dir / "data.json").read_text())
    text = (tmp_path / "wiki.train.tokens").read_text()
    assert data["tokens"]["train"] == len(wikitext_words(text))  # words + one <eos> per line
    assert r.test["perplexity"] < data["vocab_size"]  # learned something: below uniform
    assert main(["generate", str(r.run_dir), "--prompt", "the game", "--max-new-tokens", "5",
                 "--top-k", "5"]) == 0
    out = capsys.readouterr().out.split()
    assert out[:2] == ["the", "game"] and len(out) >= 2





def test_generate_decodes_a_linear_model_with_its_state(tmp_path, capsys):
    """``attnlab generate`` of a ``linear`` language model: its recurrent state (a
    StateCache) and recomputing the context give the same greedy text."""
    write_wikitext(tmp_path)
    r = run(tmp_path, "wikitext2", steps=4, mechanism="linear", data_dir=str(tmp_path),
            max_len=16, tokenizer="word", vocab_size=None)
    texts = {}
    for cache in ("yes", "no"):
        assert main(["generate", str(r.run_dir), "--prompt", "the game", "--max-new-tokens",
                     "20", "--temperature", "0", "--cache", cache]) == 0
        got = capsys.readouterr()
        texts[cache] = got.out
        want = "bounded state" if cache == "yes" else "recomputing"
        assert want in got.err and "tokens/s" in got.err
    assert texts["yes"] == texts["no"] and texts["yes"].split()[:2] == ["the", "game"]


@needs_shared
def test_inpaint_mnist_test_only_copy_is_split(tmp_path):
    r = run(tmp_path, "inpaint_mnist", steps=2, data_dir=str(SHARED), n_train=64)
    data = json.loads((r.run_dir / "data.json").read_text())
    assert data["sizes"]["validation"] + data["sizes"]["test"] == 3000


def test_attention_maps_of_a_trained_classifier(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import torch
    r = run(tmp_path, "listops", steps=2, pooling="cls", **TINY_LISTOPS)
    task, model = load_trained(r.run_dir)
    res = task.explain(model, "[MAX 2 9 [MIN 4 7 ] 0 ]")
    assert res["tokens"] == ["[CLS]", "[MAX", "2", "9", "[MIN", "4", "7", "]", "0", "]"]
    assert len(res["attention"]) == SMALL["num_layers"]
    w = res["attention"][0]
    assert w.shape == (SMALL["num_heads"], 10, 10)
    assert torch.allclose(w.sum(-1), torch.ones(SMALL["num_heads"], 10), atol=1e-5)
    assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    out = tmp_path / "att.png"
    assert main(["show-attention", "--checkpoint", str(r.run_dir), "--text", "[SM 1 2 ]", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and "prediction:" in capsys.readouterr().out
    assert main(["show-attention", "--checkpoint", str(r.run_dir), "--text", "1", "--layer", "5"]) == 2



def test_task_defaults_merge_with_overrides_and_data_dir_is_refused_where_unused(capsys):
    cfg = get_task("emotions").make_config(model_kwargs={"num_layers": 2})
    assert cfg.model_kwargs == {"d_model": 64, "num_layers": 2, "dropout": 0.3}
    assert main(["train", "--task", "listops", "--data-dir", "/tmp"]) == 2
    assert "--data-dir does not apply" in capsys.readouterr().err


def test_cli_train_reads_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('task = "copy"\nmax_steps = 2\neval_every = 2\n'
                   '[task_kwargs]\nn_train = 32\nlength = 3\n'
                   '[model_kwargs]\nd_model = 16\nnum_heads = 2\n')
    assert main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    saved = json.loads((tmp_path / "r" / "seed-0" / "config.json").read_text())
    assert saved["max_steps"] == 2 and saved["task_kwargs"]["length"] == 3
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["train", "--config", str(bad)]) == 2
    assert "malformed JSON" in capsys.readouterr().err
