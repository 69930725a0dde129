"""Tokenizers for the text tasks: word, BPE, WordPiece (the ``tokenizers`` library), byte, char.

Every kind shares the same six special tokens at the same ids, so a model, a collate
function or a loss can rely on them without asking the tokenizer::

    PAD = 0 "[PAD]"   UNK = 1 "[UNK]"   CLS = 2 "[CLS]"   BOS = 3 "[BOS]"   EOS = 4 "[EOS]"
    MASK = 5 "[MASK]"  (BERT's masked-language-model input, :mod:`attnlab.data.mlm`)

Tokenizers saved before ``[MASK]`` existed (five specials: every other id one lower) load
as they were saved and encode exactly as before; they have no mask id
(:attr:`Tokenizer.mask_id` is ``None``), so masked-language modelling refuses them.

* ``word`` -- one id per word (``tokenizers`` WordLevel). ``vocab_size=None`` keeps every
  word seen. ``pre_tokenizer="whitespace"`` (default) splits off punctuation
  (``\\w+|[^\\w\\s]+``); ``"whitespace_split"`` splits on whitespace only, for text that is
  already tokenized (WikiText-2: ``<unk>`` and ``@-@`` stay single tokens; pass
  ``lowercase=False`` there too).
* ``bpe`` -- byte-level BPE (Sennrich et al. 2016, "Neural Machine Translation of Rare Words
  with Subword Units", on bytes as in GPT-2): every text is encodable (no UNK) and
  ``decode(encode(t))`` gives back the normalized text exactly. Needs ``vocab_size >= 262``
  (the 256 bytes and the specials).
* ``wordpiece`` -- BERT's WordPiece (Wu et al. 2016, "Google's Neural Machine Translation
  System") with BERT's normalizer and pre-tokenizer (``pre_tokenizer="whitespace_split"``
  also offered); continuation pieces start with ``##``; a word with a character outside
  the trained alphabet becomes UNK. Trained by BPE over characters as the library's
  ``WordPieceTrainer`` does, but made deterministic (see :func:`_train_wordpiece`).
* ``byte`` -- UTF-8 bytes offset by the specials: id = byte + 6, vocabulary 262; nothing to
  train and no library needed.
* ``char`` -- the characters seen in training (most frequent first, ties by code point),
  after the specials; unseen characters become UNK. No library needed.

Training uses only the texts given (pass the train split) and is deterministic: the same
texts give the same vocabulary and ids. ``lowercase`` lowercases the text before every
kind, at training and at encoding. Special-token strings inside a text are not matched as
specials (``"[CLS]"`` in a review is split like any text); only where the pre-tokenizer keeps
it one word (``whitespace_split``) does the vocabulary map it to its special id.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from attnlab.data.sources import DataError
from attnlab.data.tokenizer_kinds import (
    _FORMAT,
    _PRE_TOKENIZERS,
    BOS,
    CLS,
    DEFAULT_SUBWORD_VOCAB,
    EOS,
    KINDS,
    LEGACY_SPECIAL_TOKENS,
    LIBRARY_FILE,
    MASK,
    META_FILE,
    NUM_SPECIALS,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    ByteTokenizer,
    CharTokenizer,
    LibraryTokenizer,
    Tokenizer,
    _tokenizers,
)
from attnlab.data.wordpiece import wordpiece_vocab
from attnlab.util.checks import did_you_mean

__all__ = [
    "BOS", "CLS", "EOS", "KINDS", "LEGACY_SPECIAL_TOKENS", "MASK", "NUM_SPECIALS", "PAD",
    "SPECIAL_TOKENS", "UNK",
    "ByteTokenizer", "CharTokenizer", "LibraryTokenizer", "Tokenizer",
    "load_tokenizer", "train_tokenizer",
]


def _fix_special_ids(backend):
    """Specials at ids 0..5 and the others contiguous after them, keeping their order.

    The library's WordLevel trainer gives a special a new id (and leaves a hole) when the
    same string also occurs as a word in the training texts; renumbering the model's vocab
    and the added tokens in the serialized form repairs that (BPE merges are stored as
    strings, so they are unaffected).
    """
    vocab = backend.get_vocab(with_added_tokens=True)
    if (all(vocab.get(t) == i for i, t in enumerate(SPECIAL_TOKENS))
            and sorted(vocab.values()) == list(range(len(vocab)))):
        return backend
    data = json.loads(backend.to_str())
    model_vocab = data["model"]["vocab"]
    new = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for _, tok in sorted((i, t) for t, i in model_vocab.items() if t not in new):
        new[tok] = len(new)
    data["model"]["vocab"] = new
    for added in data["added_tokens"]:
        added["id"] = new[added["content"]]
    return _tokenizers().Tokenizer.from_str(json.dumps(data))


def _pre_tokenizer(name: str):
    pre = _tokenizers().pre_tokenizers
    return {"whitespace": pre.Whitespace, "whitespace_split": pre.WhitespaceSplit,
            "bert": pre.BertPreTokenizer,
            "byte_level": lambda: pre.ByteLevel(add_prefix_space=False)}[name]()


def _train_wordpiece(texts, vocab_size, min_frequency, lowercase, pre_tokenizer):
    """WordPiece, trained deterministically (see :mod:`attnlab.data.wordpiece`)."""
    tk = _tokenizers()
    normalizer, pre = tk.normalizers.BertNormalizer(lowercase=lowercase), _pre_tokenizer(
        pre_tokenizer)
    words = Counter()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    vocab = wordpiece_vocab(words, vocab_size, min_frequency, SPECIAL_TOKENS)
    backend = tk.Tokenizer(tk.models.WordPiece(vocab=vocab, unk_token=SPECIAL_TOKENS[UNK],
                                               continuing_subword_prefix="##"))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre
    backend.decoder = tk.decoders.WordPiece(prefix="##")
    return LibraryTokenizer("wordpiece", backend, lowercase=lowercase,
                            pre_tokenizer=pre_tokenizer)


def _train_library(kind, texts, vocab_size, min_frequency, lowercase, pre_tokenizer):
    tk = _tokenizers()
    models, trainers, pre, norm, dec = (tk.models, tk.trainers, tk.pre_tokenizers,
                                        tk.normalizers, tk.decoders)
    common = {"min_frequency": min_frequency, "special_tokens": list(SPECIAL_TOKENS),
              "show_progress": False}
    if kind == "word":
        backend = tk.Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS[UNK]))
        # No limit: a vocabulary is never near 2**31 entries.
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size or 2**31 - 1, **common)
    else:
        # Byte-level: every id of the start alphabet exists before training and is assigned
        # in sorted order, so the merges' tie-breaks (by pair id) are deterministic.
        backend = tk.Tokenizer(models.BPE())  # no UNK needed
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre.ByteLevel
                                      .alphabet(), **common)
        backend.decoder = dec.ByteLevel()
    if lowercase:
        backend.normalizer = norm.Lowercase()
    backend.pre_tokenizer = _pre_tokenizer(pre_tokenizer)
    backend.encode_special_tokens = True  # "[CLS]" in a training text is text
    backend.train_from_iterator(texts, trainer)
    return LibraryTokenizer(kind, _fix_special_ids(backend), lowercase=lowercase,
                            pre_tokenizer=pre_tokenizer)


def _train_char(texts, vocab_size, min_frequency, lowercase) -> CharTokenizer:
    counts = Counter()
    for t in texts:
        counts.update(t.lower() if lowercase else t)
    ranked = sorted((c for c, n in counts.items() if n >= min_frequency),
                    key=lambda c: (-counts[c], c))  # frequency, then code point: deterministic
    if vocab_size is not None:
        ranked = ranked[: vocab_size - NUM_SPECIALS]
    return CharTokenizer(ranked, lowercase=lowercase)


def train_tokenizer(kind: str, texts: Iterable[str], *, vocab_size: int | None = None,
                    min_frequency: int = 1, lowercase: bool = True,
                    pre_tokenizer: str | None = None) -> Tokenizer:
    """A tokenizer of ``kind`` trained on ``texts`` (the train split only).

    ``vocab_size`` counts the specials and is an upper bound (a small corpus gives fewer);
    ``None`` keeps every word / character seen for ``word`` / ``char`` and means
    8000 for ``bpe`` / ``wordpiece``. Tokens seen fewer than ``min_frequency`` times are
    left out. ``byte`` needs no texts (any given are ignored).
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got "
                         f"{kind!r}{did_you_mean(kind, KINDS, n=3)}")
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts: expected an iterable of str (e.g. a list of documents), "
                        f"got a single {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
    if not isinstance(lowercase, bool):
        raise TypeError(f"lowercase: expected a bool, got {lowercase!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency: expected an int >= 1, got {min_frequency!r}")
    allowed = _PRE_TOKENIZERS[kind]
    if pre_tokenizer is None:
        pre_tokenizer = allowed[0]
    elif pre_tokenizer not in allowed:
        hint = did_you_mean(pre_tokenizer, [a for a in allowed if a], n=3)
        raise ValueError(f"pre_tokenizer: kind {kind!r} accepts {allowed}, got "
                         f"{pre_tokenizer!r}{hint}")
    minimum = NUM_SPECIALS + (256 if kind == "bpe" else 1)
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < minimum):
        why = (f"the {NUM_SPECIALS} specials and the 256 bytes" if kind == "bpe"
               else f"the {NUM_SPECIALS} specials and a token")
        raise ValueError(f"vocab_size: kind {kind!r} needs an int >= {minimum} ({why}), "
                         f"got {vocab_size!r}")
    if kind == "byte":
        if vocab_size not in (None, NUM_SPECIALS + 256):
            raise ValueError(f"vocab_size: the byte tokenizer has exactly {NUM_SPECIALS + 256} "
                             f"ids, got {vocab_size!r}")
        return ByteTokenizer(lowercase=lowercase)
    if not any(t.strip() for t in texts):
        raise ValueError(f"texts: nothing to train on ({len(texts)} texts, none with a "
                         "non-whitespace character)")
    if kind == "char":
        return _train_char(texts, vocab_size, min_frequency, lowercase)
    if vocab_size is None and kind != "word":
        vocab_size = DEFAULT_SUBWORD_VOCAB
    if kind == "wordpiece":
        return _train_wordpiece(texts, vocab_size, min_frequency, lowercase, pre_tokenizer)
    return _train_library(kind, texts, vocab_size, min_frequency, lowercase, pre_tokenizer)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved by :meth:`Tokenizer.save` in ``directory``; a missing or corrupt
    file raises ``DataError`` (a ValueError) naming it."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise DataError(f"no saved tokenizer here (missing {META_FILE}; write one with "
                        "Tokenizer.save)", path=meta_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"'format' is {meta.get('format')!r}, expected {_FORMAT!r}")
        kind, lowercase = meta["kind"], meta["lowercase"]
        if kind not in KINDS or not isinstance(lowercase, bool):
            raise ValueError(f"bad kind {kind!r} or lowercase {lowercase!r}")
        specials = tuple(meta["special_tokens"])
        if specials not in (SPECIAL_TOKENS, LEGACY_SPECIAL_TOKENS):
            raise ValueError(f"special tokens {list(specials)} differ from "
                             f"{list(SPECIAL_TOKENS)} (or, saved before [MASK] existed, "
                             f"{list(LEGACY_SPECIAL_TOKENS)})")
        if kind == "char":
            chars = meta["chars"]
            if (not isinstance(chars, list) or len(set(chars)) != len(chars)
                    or not all(isinstance(c, str) and len(c) == 1 for c in chars)):
                raise ValueError("'chars' must be a list of distinct single characters")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt tokenizer metadata: {e}", path=meta_path) from e
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer(lowercase=lowercase, specials=specials)
    elif kind == "char":
        tok = CharTokenizer(chars, lowercase=lowercase, specials=specials)
    else:
        lib_path = directory / LIBRARY_FILE
        if not lib_path.is_file():
            raise DataError("missing tokenizer file (written by Tokenizer.save)", path=lib_path)
        tk = _tokenizers()
        try:
            backend = tk.Tokenizer.from_file(str(lib_path))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise DataError(f"corrupt tokenizer file: {e}", path=lib_path) from e
        tok = LibraryTokenizer(kind, backend, lowercase=lowercase,
                               pre_tokenizer=meta.get("pre_tokenizer"), specials=specials)
        wrong = [t for i, t in enumerate(specials) if tok.token_to_id(t) != i]
        if wrong:
            raise DataError(f"special tokens {wrong} are not at their fixed ids", path=lib_path)
    if tok.vocab_size != meta.get("vocab_size"):
        raise DataError(f"vocabulary has {tok.vocab_size} ids but the metadata says "
                        f"{meta.get('vocab_size')!r}", path=meta_path)
    return tok
