"""HAN (Yang et al. 2016): the attention pooling's formula, padding, learning, and the IMDB
task with model "han" end to end on a small generated CSV (the real files when present)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from attnlab.data.text import load_imdb
from attnlab.models.han import AttentionPool, HierarchicalAttentionNetwork
from attnlab.tasks import get_task
from attnlab.tasks.text import split_sentences
from attnlab.train.config import ConfigError
from attnlab.train.loop import load_trained, train

pytestmark = pytest.mark.usefixtures("one_thread")
SHARED = Path(os.environ.get("ATTNLAB_TEST_DATA",
                             Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))
V, C = 30, 3


def model(**kw):
    torch.manual_seed(0)
    return HierarchicalAttentionNetwork(V, C, **{"d_model": 8, "hidden": 6, **kw}).double()


def batch(lengths, T=None, seed=0):
    """``ids, padding_mask`` for documents given as lists of sentence lengths."""
    g = torch.Generator().manual_seed(seed)
    S, T = max(map(len, lengths)), T or max(max(d) for d in lengths)
    ids = torch.zeros(len(lengths), S, T, dtype=torch.long)
    pad = torch.ones(len(lengths), S, T, dtype=torch.bool)
    for b, doc in enumerate(lengths):
        for s, n in enumerate(doc):
            ids[b, s, :n] = torch.randint(1, V, (n,), generator=g)
            pad[b, s, :n] = False
    return ids, pad


# ---------------------------------------------------------------- the model
def test_attention_pool_is_the_papers_formula():
    pool = AttentionPool(5).double()
    h = torch.randn(3, 4, 5, dtype=torch.float64)
    real = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    got, a = pool(h, real)
    W, b, u = pool.proj.weight, pool.proj.bias, pool.context
    for m in range(3):
        n = int(real[m].sum())
        score = torch.stack([torch.tanh(W @ h[m, t] + b) @ u for t in range(n)])  # u_t^T u_c
        alpha = torch.exp(score) / torch.exp(score).sum()
        torch.testing.assert_close(a[m, :n], alpha)
        assert (a[m, n:] == 0).all()
        torch.testing.assert_close(got[m], (alpha[:, None] * h[m, :n]).sum(0))


def test_shapes_and_weights():
    m = model()
    ids, pad = batch([[3, 5], [4, 1, 2, 6], [2]])
    assert m(ids, pad).shape == (3, C)
    maps = m.attention_maps(ids, pad)
    words, sentences = maps["words"], maps["sentences"]
    assert words.shape == ids.shape and sentences.shape == ids.shape[:2]
    real = ~pad
    assert (words[pad] == 0).all()  # padded words, padded sentences' words included
    sentence_real = real.any(-1)
    assert (sentences[~sentence_real] == 0).all()
    torch.testing.assert_close(words.sum(-1)[sentence_real],
                               torch.ones(int(sentence_real.sum()), dtype=torch.float64))
    torch.testing.assert_close(sentences.sum(-1), torch.ones(3, dtype=torch.float64))
    assert m.training  # attention_maps restores the mode


def test_a_document_gives_the_same_logits_alone_and_padded():
    m = model(num_layers=2).eval()
    ids, pad = batch([[3, 5, 2]], seed=1)
    alone = m(ids, pad)
    # Padding sentences and words added, padded ids of any value, in a batch with others.
    big_ids, big_pad = batch([[3, 5, 2], [6, 1, 4, 2, 5]], T=9, seed=2)
    big_ids[0, :3, :5] = ids[0]
    big_ids[0][big_pad[0]] = 7
    big_pad[0] = True
    big_pad[0, :3, :5] = pad[0]
    torch.testing.assert_close(m(big_ids, big_pad)[:1], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(big_ids.masked_fill(big_pad, 0), big_pad), m(big_ids, big_pad))
    torch.testing.assert_close(m(ids, None), m(ids, torch.zeros_like(pad)))


def test_config_round_trip():
    m = model(num_layers=2, dropout=0.2)
    again = type(m)(**m.config)
    assert again.config == m.config and m.num_parameters() == again.num_parameters()


def synthetic(n, seed, S=4):
    """Documents of S sentences of filler words (5..V-1); one sentence, at a random place,
    also holds the key word 3 or 4: the label is which one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (n, S, 5), generator=g)
    pad = torch.zeros(n, S, 5, dtype=torch.bool)
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(0, S, (n,), generator=g)
    ids[torch.arange(n), where, torch.randint(0, 5, (n,), generator=g)] = 3 + labels
    keyed = (ids == 3) | (ids == 4)
    key_end = torch.where(keyed.any(-1), keyed.int().argmax(-1) + 1, 0)
    lengths = torch.randint(2, 6, (n, S), generator=g).maximum(key_end)  # key word kept
    pad = torch.arange(5)[None, None] >= lengths[..., None]
    ids = ids.masked_fill(pad, 0)
    return ids, pad, labels, where


def test_it_learns_a_label_that_one_sentence_holds():
    torch.manual_seed(0)
    m = HierarchicalAttentionNetwork(V, 2, d_model=16, hidden=16, dropout=0.0)
    ids, pad, labels, _ = synthetic(256, seed=0)
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    for step in range(80):
        i = torch.arange(step * 32, step * 32 + 32) % 256
        loss = torch.nn.functional.cross_entropy(m(ids[i], pad[i]), labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, pad, labels, where = synthetic(200, seed=1)
    with torch.no_grad():
        acc = (m.eval()(ids, pad).argmax(-1) == labels).float().mean()
    assert acc > 0.95, acc
    # The sentence attention found the sentence that decides.
    w = m.attention_maps(ids, pad)["sentences"]
    assert w[torch.arange(200), where].mean() > 0.5


@pytest.mark.parametrize("args,exc,match", [
    (lambda ids, pad: (ids[0], pad[0]), ValueError, r"ids must be 3-D \(B, S, T\)"),
    (lambda ids, pad: (ids.float(), pad), TypeError, r"ids must be a LongTensor"),
    (lambda ids, pad: (ids.tolist(), pad), TypeError, r"ids must be a torch.Tensor"),
    (lambda ids, pad: (ids + V, pad), ValueError, r"ids in \[0, 30\) .*got values in"),
    (lambda ids, pad: (ids, pad[:, :1]), ValueError, r"padding_mask must have the ids' shape"),
    (lambda ids, pad: (ids, pad.long()), TypeError, r"padding_mask must be a bool tensor"),
    (lambda ids, pad: (ids, torch.ones_like(pad)), ValueError,
     r"every document needs at least one real word; documents \[0, 1\]"),
    (lambda ids, pad: (ids, pad.flip(-1)), ValueError, r"padding at the end of each sentence"),
    (lambda ids, pad: (ids, pad.flip(-2)), ValueError, r"padded sentences .* must come after"),
])
def test_bad_input(args, exc, match):
    ids, pad = batch([[2, 3], [1, 3, 2]])
    with pytest.raises(exc, match=match):
        model()(*args(ids, pad))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(hidden=0), ValueError, r"hidden must be >= 1; got 0"),
    (dict(num_classes=1), ValueError, r"num_classes must be >= 2; got 1"),
    (dict(dropout=1.0), ValueError, r"dropout"),
    (dict(pad_id=V), ValueError, r"pad_id must be < vocab_size=30; got 30"),
])
def test_bad_construction(kw, exc, match):
    args = {"vocab_size": V, "num_classes": C, **kw}
    with pytest.raises(exc, match=match):
        HierarchicalAttentionNetwork(args.pop("vocab_size"), args.pop("num_classes"), **args)


# ---------------------------------------------------------------- the IMDB task
def test_split_sentences():
    assert split_sentences("Great film! I loved it.<br /><br />Go see it") == [
        "Great film!", "I loved it.", "Go see it"]
    assert split_sentences('He said "wow!" Then left... OK? (Really.) Fine<BR/>') == [
        'He said "wow!"', "Then left...", "OK?", "(Really.)", "Fine"]
    assert split_sentences("3.5 stars, e.g.fine") == ["3.5 stars, e.g.fine"]
    assert split_sentences(" <br /> ") == []


FILLER = ["the plot moves along at its own pace.", "I watched it with my brother.",
          "The music was by a composer I did not know!", "It runs for two hours?",
          "Some scenes were shot in Rome."]


def write_imdb_csv(path: Path, n_train=96, n_test=32):
    """A review is filler sentences (with <br /> tags) around one that gives the label."""
    g = torch.Generator().manual_seed(0)
    with open(path / "imdb_aclImdb_v1.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment", "split"])
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                label = i % 2
                order = torch.randperm(len(FILLER), generator=g).tolist()[:3]
                key = "An awful, boring film." if label == 0 else "A great, wonderful film."
                sents = [FILLER[j] for j in order]
                sents.insert(int(torch.randint(0, 4, (1,), generator=g)), key)
                # No full stop before the tags: only they end that sentence.
                w.writerow([" ".join(sents[:2]).rstrip(".!?") + "<br /><br />" + " ".join(sents[2:]),
                            ["neg", "pos"][label], split])


def run_han(tmp_path, steps=24, **task_kwargs):
    cfg = get_task("imdb").make_config(
        max_steps=steps, eval_every=steps // 2, warmup_steps=2, batch_size=16, lr=1e-2,
        model="han", model_kwargs={"d_model": 16, "hidden": 16, "dropout": 0.0},
        task_kwargs={"tokenizer": "word", "vocab_size": 200, **task_kwargs}, eval_batches=4)
    return train(cfg, tmp_path / "run", progress=False)


def test_imdb_with_han_trains_end_to_end(tmp_path):
    write_imdb_csv(tmp_path)
    r = run_han(tmp_path, data_dir=str(tmp_path), max_sentences=3, max_words=5)
    rows = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "accuracy" in r.test
    data = json.loads((r.run_dir / "data.json").read_text())
    assert data["max_sentences"] == 3 and data["mean_sentences"]["train"] == 4  # 4 per review
    assert data["truncated"]["sentences"]["train"] == data["sizes"]["train"]
    task, m = load_trained(r.run_dir)
    assert isinstance(m, HierarchicalAttentionNetwork)
    b = task._batch("test", [0, 1, 2])
    assert b["ids"].shape[:2] == (3, 3) and b["ids"].shape[2] <= 5
    # head+tail with a budget of 3 sentences keeps the last 3, each cut to 5 words.
    text = task.dataset.splits["test"].texts[0]
    assert task.ids["test"][0] == [task.tokenizer.encode(x)[:5] for x in split_sentences(text)[-3:]]
    vocab = {task.tokenizer.id_to_token(i) for i in range(task.tokenizer.vocab_size)}
    assert "br" not in vocab and "<" not in vocab  # the tags were split on, not tokenized
    with pytest.raises(ConfigError, match="weighs words and sentences"):
        task.explain(m, "A great film.")


def test_imdb_han_options_are_checked(tmp_path):
    write_imdb_csv(tmp_path, n_train=8, n_test=4)
    with pytest.raises(ConfigError, match=r"max_words must be an int >= 1; got 0"):
        run_han(tmp_path, steps=2, data_dir=str(tmp_path), max_words=0)
    with pytest.raises(ConfigError, match=r"truncate must be one of .*got 'middle'"):
        run_han(tmp_path / "b", steps=2, data_dir=str(tmp_path), truncate="middle")
    cfg = get_task("text_bytes").make_config(model="han")
    with pytest.raises(ConfigError, match=r"model must be one of \['transformer', 'lstm'\]"):
        get_task("text_bytes")(cfg)


@pytest.mark.skipif(not (SHARED / "imdb").is_dir(), reason=f"no IMDB at {SHARED}")
def test_the_real_reviews_split_into_sentences():
    ds = load_imdb(SHARED, clean_html=False, validation_fraction=0.0)
    texts = ds.splits["train"].texts[:200]
    assert any("<br />" in t for t in texts)
    docs = [split_sentences(t) for t in texts]
    assert all(d for d in docs) and not any("<br" in s.lower() for d in docs for s in d)
    assert 3 < sum(map(len, docs)) / len(docs) < 40  # reviews hold a few to tens of sentences
