"""Masked-language modelling (BERT): the 80/10/10 masking and its statistics, the loss
over masked positions only, the MLM model's tied head and its encoder's names, the ``mlm``
task (fresh masks per batch, fixed evaluation masks, resumable), fine-tuning a classifier
from it with ``init_from`` (weights and tokenizer), and the ``[MASK]`` token (round trip,
tokenizers saved before it existed)."""

from __future__ import annotations

import json

import pytest
import torch
from corpora import WIKI_WORDS, write_emotions, write_wikitext
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import attnlab.tasks.mlm  # noqa: F401  (registers the task until the lead does)
from attnlab.data import tokenize as tz
from attnlab.data.mlm import IGNORE_INDEX, mask_tokens, mlm_loss
from attnlab.data.tokenize import (
    MASK,
    NUM_SPECIALS,
    SPECIAL_TOKENS,
    load_tokenizer,
    train_tokenizer,
)
from attnlab.models.classifier import EncoderClassifier
from attnlab.models.mlm import MaskedLM
from attnlab.tasks import get_task
from attnlab.train.checkpoint import load_checkpoint
from attnlab.train.config import ConfigError
from attnlab.train.loop import train
from attnlab.train.regimes import init_weights

pytestmark = pytest.mark.usefixtures("one_thread")
P_MIN = 1e-3  # a seeded draw fails a correct masking with probability < 1e-3 per test
MODEL = {"d_model": 16, "num_heads": 2, "num_layers": 1}


# ---------------------------------------------------------------- masking statistics

def _categories(ids, inputs, labels, mask_id):
    chosen = labels != IGNORE_INDEX
    masked = chosen & (inputs == mask_id)
    kept = chosen & (inputs == ids)
    return chosen, masked, kept, chosen & ~masked & ~kept


def test_masking_follows_15_percent_and_80_10_10():
    V, specials = 1000, NUM_SPECIALS
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(specials, V, (400, 128), generator=g)
    ids[:, 0] = tz.CLS                                   # specials in the text: never chosen
    ids[::7, 5] = tz.UNK
    pad = torch.zeros_like(ids, dtype=torch.bool)
    pad[::3, 100:] = True                                # padding: never chosen
    inputs, labels = mask_tokens(ids, pad, vocab_size=V, mask_id=MASK, num_specials=specials,
                                 generator=torch.Generator().manual_seed(1))
    chosen, masked, kept, rand = _categories(ids, inputs, labels, MASK)
    eligible = ~pad & (ids >= specials)
    assert not (chosen & ~eligible).any()
    assert torch.equal(inputs[~chosen], ids[~chosen])    # unchosen inputs untouched
    assert torch.equal(labels[chosen], ids[chosen])
    n, k = int(eligible.sum()), int(chosen.sum())
    assert stats.binomtest(k, n, 0.15).pvalue > P_MIN
    # a random replacement equals the original with probability 1 / (V - specials): it
    # then reads as "kept", so the expected shares are corrected for it exactly
    hit = 1 / (V - specials)
    expected = torch.tensor([0.8, 0.1 + 0.1 * hit, 0.1 * (1 - hit)], dtype=torch.float64) * k
    observed = [int(masked.sum()), int(kept.sum()), int(rand.sum())]
    assert stats.chisquare(observed, expected.tolist()).pvalue > P_MIN
    assert (inputs[rand] >= specials).all()              # never a special (nor [MASK])


def test_random_replacements_avoid_any_special_ids():
    V, special = 12, [0, 3, 7, 11]
    ids = torch.tensor([[1, 2, 4, 5, 6, 8, 9, 10] * 8] * 200)
    inputs, labels = mask_tokens(ids, vocab_size=V, mask_id=7, special_ids=special, p=0.5,
                                 generator=torch.Generator().manual_seed(2))
    _, _, _, rand = _categories(ids, inputs, labels, 7)
    assert rand.sum() > 100
    assert not torch.isin(inputs[rand], torch.tensor(special)).any()
    drawn = torch.bincount(inputs[rand], minlength=V)[[1, 2, 4, 5, 6, 8, 9, 10]]
    # uniform over the 8 ordinary ids (a draw equal to the original reads as "kept"; every
    # id is as frequent in ids, so dropping those draws leaves the counts uniform)
    assert stats.chisquare(drawn.tolist()).pvalue > P_MIN


@given(st.integers(1, 4), st.integers(1, 12), st.data())
def test_masking_invariants_over_shapes_and_padding(B, N, data):
    seed = data.draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (B, N), generator=g)
    pad = torch.rand(B, N, generator=g) < 0.3
    inputs, labels = mask_tokens(ids, pad, vocab_size=40, mask_id=MASK,
                                 num_specials=NUM_SPECIALS, p=0.6,
                                 generator=torch.Generator().manual_seed(seed))
    chosen = labels != IGNORE_INDEX
    assert not (chosen & (pad | (ids < NUM_SPECIALS))).any()
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert ((inputs[chosen] == MASK) | (inputs[chosen] >= NUM_SPECIALS)).all()
    again = mask_tokens(ids, pad, vocab_size=40, mask_id=MASK, num_specials=NUM_SPECIALS,
                        p=0.6, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


@pytest.mark.parametrize(("kw", "err", "match"), [
    ({"vocab_size": 1}, ValueError, "vocab_size"),
    ({"mask_id": 50}, ValueError, r"mask_id must be < vocab_size=50"),
    ({"p": 1.5}, ValueError, r"\bp\b"),
    ({"num_specials": None}, ValueError, "exactly one of special_ids"),
    ({"special_ids": [0, 1]}, ValueError, "exactly one of special_ids"),
    ({"num_specials": 50}, ValueError, "num_specials must be < vocab_size"),
    ({"num_specials": None, "special_ids": [0, 99]}, ValueError, r"special_ids .*got 99"),
    ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
    ({"ids": torch.ones(2, 3)}, TypeError, "ids must be a LongTensor"),
    ({"ids": torch.full((2, 3), 60)}, ValueError, r"ids must hold ids in \[0, 50\)"),
    ({"padding_mask": torch.zeros(2, 4, dtype=torch.bool)}, ValueError, "padding_mask must"),
    ({"padding_mask": torch.zeros(2, 3)}, TypeError, "padding_mask must be a bool"),
])
def test_bad_masking_arguments_are_named(kw, err, match):
    args = {"ids": torch.full((2, 3), 9), "padding_mask": None, "vocab_size": 50,
            "mask_id": MASK, "num_specials": NUM_SPECIALS, **kw}
    with pytest.raises(err, match=match):
        mask_tokens(args.pop("ids"), args.pop("padding_mask"), **args)


# ---------------------------------------------------------------- the loss

def test_loss_ignores_unmasked_positions_and_equals_the_masked_nll():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.full((3, 7), IGNORE_INDEX)
    at = [(0, 1), (0, 6), (1, 3), (2, 0), (2, 2)]
    for b, i in at:
        labels[b, i] = (b * 7 + i) % 11
    loss = mlm_loss(logits, labels)
    moved = logits.clone()
    unmasked = labels == IGNORE_INDEX
    moved[unmasked] = 100 * torch.randn(int(unmasked.sum()), 11, generator=g, dtype=torch.float64)
    assert mlm_loss(moved, labels) == loss
    hand = 0.0
    for b, i in at:  # -log softmax, written out
        z = logits[b, i]
        hand -= float(z[labels[b, i]] - torch.log(torch.exp(z - z.max()).sum()) - z.max())
    assert float(loss) == pytest.approx(hand / len(at), rel=1e-12)
    none = torch.full((3, 7), IGNORE_INDEX)
    z = logits.clone().requires_grad_()
    out = mlm_loss(z, none)
    out.backward()
    assert out.item() == 0.0 and z.grad is not None
    with pytest.raises(ValueError, match="mlm_loss: logits must be labels' shape"):
        mlm_loss(logits, labels[:, :3])


# ---------------------------------------------------------------- the model

def test_masked_lm_shares_the_classifiers_encoder_and_ties_its_decoder():
    torch.manual_seed(0)
    mlm = MaskedLM(30, max_len=10, dropout=0.0, **MODEL).eval()
    clf = EncoderClassifier(30, 4, max_len=10, **MODEL)
    ours = {k: v.shape for k, v in mlm.state_dict().items() if k.startswith(("embed", "encoder"))}
    theirs = {k: v.shape for k, v in clf.state_dict().items()
              if k.startswith(("embed", "encoder"))}
    assert ours == theirs and ours
    # no vocabulary-sized matrix of its own: the decoder is the embedding table
    assert all(p.shape != (30, 16) for p in mlm.mlm_head.parameters())
    ids = torch.randint(0, 30, (2, 10))
    h = mlm.encode(ids).double()
    head = mlm.mlm_head
    t = torch.nn.functional.gelu(h @ head.dense.weight.double().T + head.dense.bias.double())
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True)
                                                  + head.norm.eps)
    t = t * head.norm.weight.double() + head.norm.bias.double()
    want = t @ mlm.embed.weight.double().T + head.bias.double()
    torch.testing.assert_close(mlm(ids).double(), want, rtol=1e-4, atol=1e-5)
    where = torch.rand(2, 10) < 0.4
    torch.testing.assert_close(mlm.masked_logits(ids, where), mlm(ids)[where])
    # bidirectional: a later token changes an earlier position's logits
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % 30
    assert not torch.allclose(mlm(later)[:, 0], mlm(ids)[:, 0])
    with pytest.raises(ValueError, match="where must be a bool tensor"):
        mlm.masked_logits(ids, where[:, :3])


# ---------------------------------------------------------------- the task

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm-data")
    (root / "wiki").mkdir()
    (root / "emo").mkdir()
    wiki_words = WIKI_WORDS + "1 @,@ 000 <unk> fans happy sad".split()
    return (write_wikitext(root / "wiki", (160, 30, 30), words=wiki_words, stride=3,
                           heading=True),
            write_emotions(root / "emo", (96, 36, 36), class_words=3,
                           noise="the game was played in the city".split(),
                           per_text=((1, 1), (0, 5))))


def mlm_cfg(files, **kw):
    base = dict(max_steps=4, eval_every=2, checkpoint_every=2, warmup_steps=1, batch_size=8,
                lr=3e-3, model_kwargs=dict(MODEL),
                task_kwargs={"data_dir": str(files[0]), "download": False, "max_len": 16,
                             "vocab_size": 80})
    return get_task("mlm").make_config(**{**base, **kw})


def emo_cfg(files, init_from, **kw):
    base = dict(max_steps=4, eval_every=2, checkpoint_every=2, warmup_steps=1, batch_size=16,
                lr=3e-3, model_kwargs=dict(MODEL), init_from=str(init_from),
                task_kwargs={"data_dir": str(files[1]), "download": False,
                             "source": "dair-ai", "max_len": 16})
    return get_task("emotions").make_config(**{**base, **kw})


@pytest.fixture(scope="module")
def pretrained(files, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pre") / "run"
    train(mlm_cfg(files), run_dir, progress=False)
    return run_dir


def test_training_masks_are_fresh_per_batch_and_a_function_of_seed_epoch_batch(files):
    a, b = (get_task("mlm")(mlm_cfg(files)) for _ in range(2))
    a.setup()
    b.setup()
    assert a.windows["train"].shape[1] == 16 and (a.windows["train"][:, 0] == tz.CLS).all()
    for epoch, i in ((0, 0), (1, 3)):
        x, y = a.train_batches(epoch)[i], b.train_batches(epoch)[i]
        assert all(torch.equal(x[k], y[k]) for k in ("inputs", "labels"))
    e0, e1 = a.train_batches(0), a.train_batches(1)
    assert any(not torch.equal(e0[i]["labels"], e1[i]["labels"]) for i in range(3))
    other = get_task("mlm")(mlm_cfg(files, seed=1))
    other.setup()
    # evaluation masks are fixed (eval_seed), whatever the run's seed
    for u, v in zip(a.eval_batches("validation"), other.eval_batches("validation"), strict=True):
        assert torch.equal(u["inputs"], v["inputs"]) and torch.equal(u["labels"], v["labels"])


def test_task_loss_is_the_mlm_loss_of_the_full_logits(files):
    task = get_task("mlm")(mlm_cfg(files))
    task.setup()
    torch.manual_seed(0)
    model = task.build_model().eval()
    batch = task.train_batches(0)[0]
    loss, units = task.loss(model, batch)
    full = mlm_loss(model(batch["inputs"]), batch["labels"])
    torch.testing.assert_close(loss, full)
    assert units == batch["inputs"].numel()


def test_pretraining_reports_metrics_and_resumes_to_the_same_weights(files, pretrained,
                                                                      tmp_path):
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["metric"] == "mlm_perplexity" and summary["mode"] == "min"
    test = summary["test"]
    assert 0 <= test["mlm_accuracy"] <= 1 and test["masked_tokens"] > 0
    assert test["mlm_perplexity"] == pytest.approx(torch.tensor(test["loss"]).exp().item())
    data = json.loads((pretrained / "data.json").read_text())
    assert data["tokenizer"] == "wordpiece" and data["windows"]["train"] > 8
    cut = train(mlm_cfg(files), tmp_path / "cut", progress=False, stop_after=3)
    assert cut.status == "interrupted"
    train(mlm_cfg(files), tmp_path / "cut", progress=False, resume=True)
    a = load_checkpoint(pretrained / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_loads_the_encoder_and_reuses_the_tokenizer(files, pretrained, tmp_path):
    best = load_checkpoint(pretrained / "best.pt")["model"]
    task = get_task("emotions")(emo_cfg(files, pretrained), tmp_path / "probe")
    task.setup()
    model = task.build_model()
    info = init_weights(model, pretrained)
    own = model.state_dict()
    encoder = [k for k in best if k.startswith(("embed.", "encoder."))]
    assert encoder and all(torch.equal(own[k], best[k]) for k in encoder)
    assert all(k.startswith(("head.", "pool.")) for k in info["kept_initialisation"])
    pre_tok = load_tokenizer(pretrained / "tokenizer")
    assert task.tokenizer.get_vocab() == pre_tok.get_vocab()
    data = json.loads((tmp_path / "probe" / "data.json").read_text())
    assert data["tokenizer_from"] == str(pretrained)
    assert data["tokenizer"] == "wordpiece" and data["vocab_size"] == pre_tok.vocab_size
    # the whole run, and the same run cut and resumed, end with the same weights
    whole = train(emo_cfg(files, pretrained), tmp_path / "whole", progress=False)
    assert whole.summary["init_from"] == str(pretrained)
    assert load_tokenizer(tmp_path / "whole" / "tokenizer").get_vocab() == pre_tok.get_vocab()
    train(emo_cfg(files, pretrained), tmp_path / "cut", progress=False, stop_after=2)
    train(emo_cfg(files, pretrained), tmp_path / "cut", progress=False, resume=True)
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_refuses_sources_it_cannot_use(files, pretrained, tmp_path):
    copy = get_task("copy").make_config(max_steps=1, eval_every=1, model_kwargs=dict(MODEL),
                                        task_kwargs={"n_train": 16, "n_validation": 8,
                                                     "n_test": 8, "length": 4})
    train(copy, tmp_path / "copy", progress=False)
    with pytest.raises(ConfigError, match="has no saved tokenizer"):
        get_task("emotions")(emo_cfg(files, tmp_path / "copy"), tmp_path / "a").setup()
    with pytest.raises(ConfigError, match="does not exist"):
        get_task("emotions")(emo_cfg(files, tmp_path / "nowhere"), tmp_path / "b").setup()
    for name, mk, match in (("wide", {"d_ff": 32}, "encoder weight.* other shapes"),
                            ("rope", {"positions": "rope"}, "positions='sinusoidal'")):
        task = get_task("emotions")(emo_cfg(files, pretrained, model_kwargs={**MODEL, **mk}),
                                    tmp_path / name)
        task.setup()
        with pytest.raises(ConfigError, match=match):
            task.build_model()


def test_bad_mlm_options_are_named(files):
    for opt, match in (({"corpus": "wiki"}, "corpus must be one of"),
                       ({"max_len": 2}, "max_len must be an int >= 3"),
                       ({"mask_prob": 0.0}, r"mask_prob must be a float in \(0, 1\)"),
                       ({"max_len": 4096}, "fewer than one window")):
        cfg = mlm_cfg(files, task_kwargs={"data_dir": str(files[0]), "download": False,
                                          "vocab_size": 80, **opt})
        with pytest.raises(ConfigError, match=match):
            get_task("mlm")(cfg).setup()


# ---------------------------------------------------------------- the [MASK] token

CORPUS = ["the quick brown fox", "a lazy dog and the fox", "the the fox"]


@pytest.mark.parametrize("kind", ["word", "bpe", "wordpiece", "byte", "char"])
def test_mask_token_round_trip(kind, tmp_path):
    tok = train_tokenizer(kind, CORPUS, **({"vocab_size": 300} if kind == "bpe" else {}))
    assert SPECIAL_TOKENS[MASK] == "[MASK]" and tok.mask_id == MASK
    assert tok.token_to_id("[MASK]") == MASK and tok.id_to_token(MASK) == "[MASK]"
    ids = tok.encode("the fox")
    assert MASK not in tok.encode("the [MASK] fox")       # text spelling it is text
    assert tok.decode([ids[0], MASK, *ids[1:]]) == tok.decode(ids)
    assert "[MASK]" in tok.decode([MASK, *ids], skip_special_tokens=False)
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.mask_id == MASK and back.encode_batch(CORPUS) == tok.encode_batch(CORPUS)


def _old_save(root, kind, **extra):
    """A tokenizer directory as attnlab wrote it before [MASK]: five specials."""
    root.mkdir()
    old = list(SPECIAL_TOKENS[:5])
    meta = {"format": "attnlab-tokenizer", "version": 1, "kind": kind, "lowercase": False,
            "pre_tokenizer": None, "special_tokens": old, **extra}
    if kind == "word":
        tk = pytest.importorskip("tokenizers")
        vocab = {t: i for i, t in enumerate(old)} | {"the": 5, "fox": 6, "[MASK]": 7}
        backend = tk.Tokenizer(tk.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
        backend.add_special_tokens(old)
        backend.save(str(root / tz.LIBRARY_FILE))
        meta.update(pre_tokenizer="whitespace_split", vocab_size=8)
    (root / tz.META_FILE).write_text(json.dumps(meta))
    return root


def test_tokenizers_saved_before_mask_load_and_encode_as_before(tmp_path, files):
    byte = load_tokenizer(_old_save(tmp_path / "byte", "byte", vocab_size=261))
    assert byte.vocab_size == 261 and byte.mask_id is None
    assert byte.encode("aé") == [b + 5 for b in "aé".encode()]
    assert byte.decode(byte.encode("aé")) == "aé" and byte.id_to_token(5) == "\x00"
    char = load_tokenizer(_old_save(tmp_path / "char", "char", chars=["a", "b"],
                                    vocab_size=7))
    assert char.encode("bax") == [6, 5, tz.UNK] and char.mask_id is None
    word = load_tokenizer(_old_save(tmp_path / "word", "word"))
    assert word.encode("the fox [MASK] cat") == [5, 6, 7, tz.UNK] and word.mask_id is None
    word.save(tmp_path / "again")                         # stays an old-layout tokenizer
    assert load_tokenizer(tmp_path / "again").encode("the fox") == [5, 6]
    # an MLM run cannot mask with it: refused by name
    run = tmp_path / "mlm-run"
    run.mkdir()
    _old_save(run / "tokenizer", "char", chars=list("abcdefghijklmnopqrstuvwxyz "),
              vocab_size=32)
    with pytest.raises(ConfigError, match=r"has no \[MASK\] token"):
        get_task("mlm")(mlm_cfg(files), run).setup()
    meta = json.loads((tmp_path / "byte" / tz.META_FILE).read_text())
    meta["special_tokens"] = ["[PAD]", "[UNK]"]
    (tmp_path / "byte" / tz.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"special tokens .* differ .*before \[MASK\]"):
        load_tokenizer(tmp_path / "byte")
