"""Tokenizers: fixed special ids, round trips, unknowns, determinism, save/load, errors,
and word-level WikiText-2 (real data, skipped when ../shared is absent)."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import pickle
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnlab.data import tokenize as tz
from attnlab.data.tokenize import (
    BOS,
    CLS,
    EOS,
    KINDS,
    MASK,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    load_tokenizer,
    train_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A lazy dog sleeps; the fox runs away!",
    "Foxes and dogs are animals, and animals are quick or lazy.",
    "Unbelievable: the unhappy fox was unable to undo the knot.",
    "the the the fox fox dog",
]
SIZES = {"word": None, "bpe": 300, "wordpiece": 60, "byte": None, "char": None}
# word / bpe / wordpiece need the optional `tokenizers` (extra "data"); CI may lack it.
needs_lib = pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                               reason="tokenizers not installed (pip install attnlab[data])")
LIBRARY_KINDS = ("word", "bpe", "wordpiece")


def kinds(*names):
    """Parameters for these kinds (all by default), library kinds skipped without it."""
    return [pytest.param(k, marks=needs_lib) if k in LIBRARY_KINDS else k
            for k in (names or KINDS)]


def _train(kind, texts=CORPUS, **kw):
    kw = {"vocab_size": SIZES[kind], **kw}
    return train_tokenizer(kind, texts, **kw)


def _data_dir() -> Path:
    env = os.environ.get("ATTNLAB_TEST_DATA")
    return Path(env) if env else Path(__file__).parents[1].parent / "shared" / "datasets"


# ---------------------------------------------------------------- specials, unknowns


@pytest.mark.parametrize("kind", kinds())
def test_specials_at_fixed_ids_and_vocab_contiguous(kind):
    assert (PAD, UNK, CLS, BOS, EOS, MASK) == (0, 1, 2, 3, 4, 5)
    tok = _train(kind)
    assert tok.kind == kind
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert [tok.id_to_token(i) for i in range(6)] == list(SPECIAL_TOKENS)
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(tok.vocab_size))
    # Plain text never produces PAD/CLS/BOS/EOS/MASK, even when it spells them.
    ids = tok.encode("the fox [CLS] [PAD] [EOS] [MASK]")
    assert not {PAD, CLS, BOS, EOS, MASK} & set(ids)


@pytest.mark.parametrize("kind", kinds("word", "wordpiece"))
def test_special_strings_in_training_text_keep_fixed_ids(kind):
    # The library's WordLevel trainer renumbers a special that also occurs as a word;
    # the tokenizer must repair that (whitespace_split keeps "[CLS]" one word).
    texts = ["a b [CLS] c [CLS] [PAD] [UNK] [MASK]"] * 3
    tok = train_tokenizer(kind, texts, lowercase=False, pre_tokenizer="whitespace_split")
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert sorted(tok.get_vocab().values()) == list(range(tok.vocab_size))
    assert tok.encode("a")[0] >= 6


@needs_lib
def test_word_vocab_matches_python_count_and_unknown_is_unk():
    tok = train_tokenizer("word", CORPUS)
    words = Counter(w for t in CORPUS for w in re.findall(r"\w+|[^\w\s]+", t.lower()))
    assert tok.vocab_size == 6 + len(words)
    # Most frequent first, ties by string: the library's documented deterministic order.
    ranked = sorted(words, key=lambda w: (-words[w], w))
    assert [tok.id_to_token(i) for i in range(6, tok.vocab_size)] == ranked
    ids = tok.encode("The zebra jumps")
    assert ids == [tok.token_to_id("the"), UNK, tok.token_to_id("jumps")]
    assert tok.decode(ids) == "the [UNK] jumps"
    # vocab_size and min_frequency cut from the bottom of the same ranking
    small = train_tokenizer("word", CORPUS, vocab_size=9)
    assert [small.id_to_token(i) for i in range(6, 9)] == ranked[:3]
    frequent = train_tokenizer("word", CORPUS, min_frequency=3)
    assert {frequent.id_to_token(i) for i in range(6, frequent.vocab_size)} == {
        w for w, n in words.items() if n >= 3}


def test_char_vocab_and_unknown():
    tok = train_tokenizer("char", ["abca", "b"], lowercase=False)
    assert tok.chars == ["a", "b", "c"]  # by frequency, then code point
    assert tok.encode("cabz") == [8, 6, 7, UNK]
    assert tok.decode(tok.encode("cabz")) == "cab[UNK]"
    assert train_tokenizer("char", ["abca", "b"], vocab_size=8).chars == ["a", "b"]
    assert train_tokenizer("char", ["AbcA"]).encode("A") == [6]  # lowercased


@pytest.mark.parametrize("kind", kinds("bpe", "byte"))
def test_byte_level_kinds_have_no_unknowns(kind):
    tok = _train(kind)
    text = "Zebras, 日本語 and émojis 🤖 never seen\x00"
    assert UNK not in tok.encode(text)


@needs_lib
def test_wordpiece_splits_unseen_words_into_pieces():
    tok = train_tokenizer("wordpiece", CORPUS * 4, vocab_size=120)
    vocab = tok.get_vocab()
    assert any(t.startswith("##") for t in vocab)
    # "foxdog" was never seen but is made of pieces: no UNK, and it decodes back.
    ids = tok.encode("foxdog")
    assert UNK not in ids and len(ids) > 1
    assert tok.id_to_token(ids[1]).startswith("##")
    assert tok.decode(ids) == "foxdog"
    # a character never seen becomes UNK (the whole word, as in BERT)
    assert tok.encode("fox zqx") == [tok.encode("fox")[0], UNK]
    # vocab_size is an upper bound even when the alphabet alone would exceed it
    assert train_tokenizer("wordpiece", CORPUS, vocab_size=20).vocab_size <= 20


@functools.cache
def _wordpiece():
    return train_tokenizer("wordpiece", CORPUS * 4, vocab_size=120, lowercase=False)


def _greedy_wordpiece(word: str, vocab: dict[str, int]) -> list[int]:
    """BERT's WordPiece encoding of one word: longest vocabulary match first, "##" after
    the first piece, the whole word UNK if some position matches nothing."""
    ids, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                ids.append(vocab[piece])
                start = end
                break
        else:
            return [UNK]
    return ids


@needs_lib
@given(st.text(alphabet="abdefgilnorstuxyz", min_size=1, max_size=12))
def test_wordpiece_is_greedy_longest_match_over_its_vocab(word):
    tok = _wordpiece()
    assert tok.encode(word) == _greedy_wordpiece(word, tok.get_vocab())


@needs_lib
def test_bpe_learns_merges_of_frequent_words():
    tok = train_tokenizer("bpe", CORPUS * 4, vocab_size=320)
    assert 262 < tok.vocab_size <= 320
    assert len(tok.encode("the fox")) < len("the fox")  # merged, unlike bytes
    assert len(tok.encode(" lazy")) == 1  # a frequent word (with its space) is one token


# ---------------------------------------------------------------- round trips


def test_byte_token_names():
    tok = train_tokenizer("byte", [])
    assert tok.id_to_token(ord("A") + 6) == "A" and tok.id_to_token(0xC3 + 6) == "<0xC3>"
    assert all(tok.token_to_id(tok.id_to_token(i)) == i for i in range(tok.vocab_size))
    assert tok.token_to_id("é") is None and tok.id_to_token(262) is None


@given(st.text(max_size=40))
def test_byte_round_trip_any_text(text):
    tok = train_tokenizer("byte", [], lowercase=False)
    ids = tok.encode(text)
    assert ids == [b + 6 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text


@functools.cache
def _bpe():
    return train_tokenizer("bpe", CORPUS * 3, vocab_size=300, lowercase=False)


@needs_lib
@given(st.text(max_size=40))
def test_bpe_round_trip_any_text(text):
    ids = _bpe().encode(text)
    assert _bpe().decode(ids) == text and UNK not in ids


_CHARS = "".join(sorted(set("".join(CORPUS))))


@given(st.text(alphabet=_CHARS, max_size=40))
def test_char_round_trip_on_seen_characters(text):
    tok = train_tokenizer("char", CORPUS, lowercase=False)
    assert tok.decode(tok.encode(text)) == text


@needs_lib
@given(st.lists(st.sampled_from(sorted({w for t in CORPUS for w in t.split()})), max_size=12))
def test_word_round_trip_whitespace_split(words):
    tok = train_tokenizer("word", CORPUS, lowercase=False, pre_tokenizer="whitespace_split")
    ids = tok.encode(" ".join(words))
    assert len(ids) == len(words) and UNK not in ids
    assert tok.decode(ids) == " ".join(words)


@pytest.mark.parametrize("kind", kinds())
def test_decode_skips_specials_and_checks_ids(kind):
    tok = _train(kind)
    ids = tok.encode("the fox")
    assert tok.decode([CLS, BOS, *ids, EOS, PAD, PAD]) == tok.decode(ids)
    kept = tok.decode([CLS, *ids], skip_special_tokens=False)
    assert "[CLS]" in kept
    with pytest.raises(ValueError, match=rf"ids: .*\[0, {tok.vocab_size}\).*got {tok.vocab_size}"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="got -1"):
        tok.decode([-1])


@pytest.mark.parametrize("kind", kinds())
def test_encode_batch_equals_encode(kind):
    tok = _train(kind)
    texts = [*CORPUS, "", "unseen zebra words"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


# ---------------------------------------------------------------- determinism, save/load


@pytest.mark.parametrize("kind", kinds())
def test_training_is_deterministic(kind):
    # Several runs: the library's own WordPieceTrainer numbers its "##" units in hash-map
    # order (huggingface/tokenizers#1794), which two runs alone might not expose.
    first, *others = [_train(kind, texts=CORPUS * 2) for _ in range(4)]
    for other in others:
        assert other.get_vocab() == first.get_vocab()
        assert other.encode_batch(CORPUS) == first.encode_batch(CORPUS)


@pytest.mark.parametrize("kind", kinds("word", "char", "bpe", "wordpiece"))
def test_text_order_does_not_change_the_vocabulary(kind):
    # counts are order-free, and ties are broken by the token, not by first appearance
    assert _train(kind).get_vocab() == _train(kind, texts=CORPUS[::-1]).get_vocab()


@pytest.mark.parametrize("kind", kinds())
def test_save_load_round_trip(kind, tmp_path):
    tok = _train(kind, lowercase=False)
    tok.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert (back.kind, back.vocab_size, back.lowercase) == (kind, tok.vocab_size, False)
    texts = [*CORPUS, "Zebra [CLS] 日本 unseen"]
    assert back.encode_batch(texts) == tok.encode_batch(texts)
    assert back.get_vocab() == tok.get_vocab()
    meta = json.loads((tmp_path / "tok" / tz.META_FILE).read_text())
    assert meta["kind"] == kind and meta["vocab_size"] == tok.vocab_size


@pytest.mark.parametrize("kind", kinds())
def test_pickle_round_trip(kind):
    # DataLoader workers receive the tokenizer pickled; "[CLS]" must stay plain text there.
    tok = _train(kind, lowercase=False)
    back = pickle.loads(pickle.dumps(tok))
    texts = [*CORPUS, "the [CLS] fox [PAD]"]
    assert back.encode_batch(texts) == tok.encode_batch(texts)
    assert CLS not in back.encode("the [CLS] fox")


@pytest.mark.parametrize("kind", kinds("word", "char"))
def test_load_corrupt_or_missing_names_the_path(kind, tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nothing"))):
        load_tokenizer(tmp_path / "nothing")
    _train(kind).save(tmp_path)
    target = tmp_path / (tz.LIBRARY_FILE if kind == "word" else tz.META_FILE)
    target.write_text(target.read_text()[:50])  # truncated file
    with pytest.raises(ValueError, match=re.escape(str(target))):
        load_tokenizer(tmp_path)


def test_load_rejects_wrong_vocab_size(tmp_path):
    _train("char").save(tmp_path)
    meta = json.loads((tmp_path / tz.META_FILE).read_text())
    meta["vocab_size"] += 1
    (tmp_path / tz.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="metadata says"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("call", "match"), [
    (lambda: train_tokenizer("wrod", CORPUS), r"kind: .*'wrod'.*did you mean 'word'"),
    (lambda: train_tokenizer("word", CORPUS, vocab_size=4), r"vocab_size: .*>= 7.*got 4"),
    (lambda: train_tokenizer("char", CORPUS, vocab_size=2), r"vocab_size: .*got 2"),
    (lambda: train_tokenizer("bpe", CORPUS, vocab_size=100), r"vocab_size: .*>= 262.*256 bytes"),
    (lambda: train_tokenizer("byte", CORPUS, vocab_size=300), r"vocab_size: .*exactly 262"),
    (lambda: train_tokenizer("word", []), r"texts: nothing to train on \(0 texts"),
    (lambda: train_tokenizer("char", ["", "  "]), r"texts: nothing to train on \(2 texts"),
    (lambda: train_tokenizer("word", CORPUS, min_frequency=0), r"min_frequency: .*got 0"),
    (lambda: train_tokenizer("word", CORPUS, pre_tokenizer="whitespaces"),
     r"pre_tokenizer: .*did you mean 'whitespace'"),
    (lambda: train_tokenizer("bpe", CORPUS, pre_tokenizer="bert"), r"pre_tokenizer: .*'bpe'"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_text_types_are_named():
    with pytest.raises(TypeError, match="texts: .*single str"):
        train_tokenizer("word", "one long string")
    with pytest.raises(TypeError, match=r"texts\[1\]: expected str, got int"):
        train_tokenizer("word", ["ok", 3])


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match=r"tokenizers.* needs `tokenizers`, which is not "
                                          r'installed.*pip install -e "\.\[data\]"'):
        train_tokenizer("word", CORPUS)
    # byte and char need no library
    assert train_tokenizer("char", CORPUS).encode("t") == [train_tokenizer("char", CORPUS)
                                                            .token_to_id("t")]
    assert train_tokenizer("byte", []).encode("a") == [ord("a") + 6]


# ---------------------------------------------------------------- WikiText-2 (real data)


@pytest.fixture(scope="module")
def wikitext():
    d = _data_dir() / "wikitext-2"
    if not (d / "train.txt.gz").is_file():
        pytest.skip(f"WikiText-2 not found under {d}")
    splits = {}
    for s in ("train", "valid"):
        with gzip.open(d / f"{s}.txt.gz", "rt", encoding="utf-8") as f:
            splits[s] = f.readlines()
    return splits


@needs_lib
def test_wikitext2_word_level(wikitext):
    train, valid = wikitext["train"], wikitext["valid"]
    tok = train_tokenizer("word", train, lowercase=False, pre_tokenizer="whitespace_split")
    types = {w for line in train for w in line.split()}
    assert len(types) == 33_277  # 33,278 with <eos>, the standard WikiText-2 vocabulary
    assert tok.vocab_size == 6 + len(types)
    for t in ("<unk>", "@-@", "@,@", "@.@"):
        assert tok.token_to_id(t) is not None
        assert tok.encode(f" {t} ") == [tok.token_to_id(t)]
    # one id per whitespace token, none unknown (valid has no word outside train)
    sample = valid[:400]
    ids = tok.encode_batch(sample)
    assert [len(x) for x in ids] == [len(line.split()) for line in sample]
    assert UNK not in {i for x in ids for i in x}
    assert [tok.decode(x) for x in ids[:50]] == [" ".join(line.split()) for line in sample[:50]]
    # the default (punctuation-splitting) pre-tokenizer would break them apart
    assert len(train_tokenizer("word", train[:200]).encode("<unk> @-@")) > 2
