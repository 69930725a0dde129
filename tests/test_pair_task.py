"""The two-sequence task: seeded fact-lookup pairs (checked pair by pair against their
definition), the PairClassifier with each pairing, and the registered task training past
what either sequence alone allows."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

import attnlab.mechanisms.co_attention  # noqa: F401
import attnlab.tasks.pair  # noqa: F401  (registers fact_lookup)
from attnlab.data.pairs import PAD, fact_lookup, passage_only_accuracy
from attnlab.models.pair import PairClassifier, pairings
from attnlab.tasks import get_task
from attnlab.train.config import ConfigError
from attnlab.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 100
PAIRINGS = ("co_attention_parallel", "co_attention_alternating", "cross")
SETTINGS = [dict(), dict(num_keys=5, min_facts=1, max_facts=3, min_question=1, max_question=3),
            dict(max_question=1, min_question=1), dict(answer="key", min_facts=4, max_facts=4)]


# ---------------------------------------------------------------- the data
def test_data_are_deterministic_per_seed():
    a, b, c = fact_lookup(200, seed=3), fact_lookup(200, seed=3), fact_lookup(200, seed=4)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert not torch.equal(a.passage, c.passage) and not torch.equal(a.labels, c.labels)
    assert fact_lookup(0).question.shape == (0, 4)


@pytest.mark.parametrize("kw", SETTINGS, ids=["default", "small", "one-key", "key"])
def test_every_pair_is_what_the_task_says(kw):
    d = fact_lookup(300, **kw, seed=1)
    o = {"num_keys": 16, "num_values": 8, "min_facts": 2, "max_facts": 6, "min_question": 1,
         "max_question": 4, "answer": "value", **kw}
    K = o["num_keys"]
    assert d.vocab_size == 1 + K + o["num_values"] and d.question.shape == (300, o["max_question"])
    assert d.passage.shape == (300, 2 * o["max_facts"])
    for i in range(300):
        L, N = int(d.question_lengths[i]), int(d.passage_lengths[i])
        assert o["min_question"] <= L <= o["max_question"] and N % 2 == 0
        assert o["min_facts"] <= N // 2 <= o["max_facts"]
        q, p = d.question[i].tolist(), d.passage[i].tolist()
        assert set(q[L:]) <= {PAD} and set(p[N:]) <= {PAD}
        keys, values = p[0:N:2], p[1:N:2]
        assert all(1 <= k <= K for k in keys + q[:L]) and all(v > K for v in values)
        assert len(set(keys)) == len(keys) and len(set(q[:L])) == L
        shared = set(q[:L]) & set(keys)
        assert len(shared) == 1  # one question key in the passage, the others nowhere
        (key,) = shared
        want = key - 1 if o["answer"] == "key" else values[keys.index(key)] - K - 1
        assert int(d.labels[i]) == want
    assert set(d.labels.tolist()) == set(range(d.num_classes))  # every class occurs


def test_passage_only_accuracy_is_the_modal_value_count():
    d = fact_lookup(400, num_values=3, max_facts=4, seed=2)
    want = 0.0
    for i in range(400):
        n = int(d.passage_lengths[i])
        values = d.passage[i, 1:n:2].tolist()
        want += max(collections.Counter(values).values()) / (n // 2)
    assert passage_only_accuracy(d) == pytest.approx(want / 400)
    with pytest.raises(ValueError, match="answer='value'"):
        passage_only_accuracy(fact_lookup(4, answer="key"))


@pytest.mark.parametrize("kw, msg", [
    (dict(num_keys=8, max_facts=6, max_question=4), r"num_keys must be >= max_facts \+ max_question - 1 = 9.*got 8"),
    (dict(min_facts=3, max_facts=2), r"fact_lookup: max_facts must be >= 3; got 2"),
    (dict(num_values=1), r"fact_lookup: num_values must be >= 2; got 1"),
    (dict(answer="keys"), r"answer must be one of 'value', 'key'; got 'keys'; did you mean"),
    (dict(max_question=True), r"max_question must be an int; got bool"),
])
def test_bad_generator_arguments_are_named(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        fact_lookup(4, **kw)


# ---------------------------------------------------------------- the model
def small_model(pairing, encoder="lstm", **kw):
    torch.manual_seed(0)
    return PairClassifier(30, 5, pairing=pairing, encoder=encoder, d_model=16, num_heads=2,
                          max_len=16, dropout=0.0, **kw).eval()


@pytest.mark.parametrize("encoder", ["lstm", "transformer"])
@pytest.mark.parametrize("pairing", PAIRINGS)
def test_a_pair_alone_equals_it_in_a_padded_batch(pairing, encoder):
    m = small_model(pairing, encoder)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, 30, (3, 5), generator=g), torch.randint(1, 30, (3, 9), generator=g)
    la, lb = torch.tensor([5, 2, 3]), torch.tensor([9, 4, 1])
    a_pad, b_pad = torch.arange(5) >= la[:, None], torch.arange(9) >= lb[:, None]
    with torch.no_grad():
        batch = m(a.masked_fill(a_pad, PAD), b.masked_fill(b_pad, PAD), a_pad, b_pad)
        for i in range(3):
            alone = m(a[i:i + 1, :la[i]], b[i:i + 1, :lb[i]])
            torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    assert batch.shape == (3, 5) and m.config["pairing"] == pairing
    rebuilt = type(m)(**m.config)  # the config rebuilds the architecture
    assert sum(p.numel() for p in rebuilt.parameters()) == m.num_parameters()


def test_bad_model_arguments_are_named():
    with pytest.raises(ValueError, match=r"pairing must be one of .*'cross'; got 'co_attention'"):
        small_model("co_attention")
    with pytest.raises(ValueError, match=r"positions and d_ff are transformer options"):
        small_model("cross", "lstm", positions="rope")
    with pytest.raises(ValueError, match=r"encoder must be one of 'transformer', 'lstm'"):
        small_model("cross", "gru")
    m = small_model("co_attention_parallel")
    with pytest.raises(ValueError, match=r"a_ids and b_ids batch sizes differ"):
        m(torch.ones(2, 3, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"b_ids must hold ids in \[0, 30\)"):
        m(torch.ones(2, 3, dtype=torch.long), torch.full((2, 4), 30))
    with pytest.raises(ValueError, match=r"encoder='lstm' needs a_padding to mark padding at the end"):
        m(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.long),
          torch.tensor([[True, False, False]]))
    assert pairings() == [*sorted(PAIRINGS[:2]), "cross"]


# ---------------------------------------------------------------- the task
EASY = {"n_train": 4096, "n_validation": 256, "n_test": 64, "num_keys": 10, "num_values": 6,
        "min_facts": 3, "max_facts": 4, "min_question": 1, "max_question": 2}
KEY = {"answer": "key", "min_question": 2, "max_question": 3}  # the question alone: 1/L


def run(tmp_path, pairing, model, steps, lr, **task_kwargs):
    cfg = get_task("fact_lookup").make_config(
        model=model, max_steps=steps, eval_every=steps, warmup_steps=10, batch_size=32, lr=lr,
        model_kwargs={"d_model": 32, "num_heads": 2, "pairing": pairing, "dropout": 0.0},
        task_kwargs={**EASY, **task_kwargs})
    return train(cfg, tmp_path / f"{pairing}-{model}", progress=False)


def one_side_only(data):
    """Best accuracies from the question alone and the passage alone for answer="key":
    a guess among the question's keys (1 / L) or among the passage's (1 / P)."""
    return (float((1 / data.question_lengths.double()).mean()),
            float((2 / data.passage_lengths.double()).mean()))


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_each_pairing_trains_past_either_side_alone(tmp_path, pairing):
    """answer="key" with transformer encoders: the pairing alone has to match the two sides."""
    r = run(tmp_path, pairing, "transformer", STEPS, 3e-3, **KEY)
    data = validation(**KEY)
    acc = r.summary["best_validation"]["accuracy"]
    assert acc > max(one_side_only(data)) + 0.3, (acc, one_side_only(data))
    assert "accuracy" in r.test and r.test["n"] == EASY["n_test"]


def validation(**kw):
    """The task's validation split for EASY (data_seed 0: seed 1)."""
    o = {**{k: v for k, v in EASY.items() if not k.startswith("n_")}, **kw}
    return fact_lookup(EASY["n_validation"], **o, seed=1)


def test_value_lookup_with_a_bilstm_reads_the_question_too(tmp_path):
    """answer="value": above the best any passage-only model can do."""
    r = run(tmp_path, "co_attention_parallel", "lstm", 300, 5e-3)
    ceiling = passage_only_accuracy(validation())
    assert r.summary["best_validation"]["accuracy"] > ceiling + 0.15, ceiling


def test_task_defaults_and_bad_options():
    t = get_task("fact_lookup")
    cfg = t.make_config()
    assert cfg.model == "lstm" and cfg.model_kwargs["pairing"] == "co_attention_parallel"
    task = t(t.make_config(task_kwargs={"num_keys": 3}))
    with pytest.raises(ConfigError, match=r"task 'fact_lookup': fact_lookup: num_keys must be >= max_facts \+ max_question - 1 = 9"):
        task.setup()
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'n_trian' \(did you mean 'n_train'"):
        t(t.make_config(task_kwargs={"n_trian": 5}))
    task = t(t.make_config(model_kwargs={"d_ff": 8}, task_kwargs={"n_train": 8}))
    task.setup()
    with pytest.raises(ConfigError, match=r"model 'lstm': unknown model option\(s\) 'd_ff'"):
        task.build_model()
