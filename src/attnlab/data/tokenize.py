"""Tokenizers for the text tasks: word, BPE, WordPiece (the ``tokenizers`` library), byte, char.

Every kind shares the same five special tokens at the same ids, so a model, a collate
function or a loss can rely on them without asking the tokenizer::

    PAD = 0 "[PAD]"   UNK = 1 "[UNK]"   CLS = 2 "[CLS]"   BOS = 3 "[BOS]"   EOS = 4 "[EOS]"

* ``word`` -- one id per word (``tokenizers`` WordLevel). ``vocab_size=None`` keeps every
  word seen. ``pre_tokenizer="whitespace"`` (default) splits off punctuation
  (``\\w+|[^\\w\\s]+``); ``"whitespace_split"`` splits on whitespace only, for text that is
  already tokenized (WikiText-2: ``<unk>`` and ``@-@`` stay single tokens; pass
  ``lowercase=False`` there too).
* ``bpe`` -- byte-level BPE (Sennrich et al. 2016, "Neural Machine Translation of Rare Words
  with Subword Units", on bytes as in GPT-2): every text is encodable (no UNK) and
  ``decode(encode(t))`` gives back the normalized text exactly. Needs ``vocab_size >= 261``
  (the 256 bytes and the specials).
* ``wordpiece`` -- BERT's WordPiece (Wu et al. 2016, "Google's Neural Machine Translation
  System") with BERT's normalizer and pre-tokenizer (``pre_tokenizer="whitespace_split"``
  also offered); continuation pieces start with ``##``; a word with a character outside
  the trained alphabet becomes UNK. Trained by BPE over characters as the library's
  ``WordPieceTrainer`` does, but made deterministic (see :func:`_train_wordpiece`).
* ``byte`` -- UTF-8 bytes offset by the specials: id = byte + 5, vocabulary 261; nothing to
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
from attnlab.data.wordpiece import wordpiece_vocab
from attnlab.util.checks import did_you_mean

__all__ = [
    "BOS", "CLS", "EOS", "KINDS", "NUM_SPECIALS", "PAD", "SPECIAL_TOKENS", "UNK",
    "ByteTokenizer", "CharTokenizer", "LibraryTokenizer", "Tokenizer",
    "load_tokenizer", "train_tokenizer",
]

PAD, UNK, CLS, BOS, EOS = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[BOS]", "[EOS]")
NUM_SPECIALS = len(SPECIAL_TOKENS)
KINDS = ("word", "bpe", "wordpiece", "byte", "char")
DEFAULT_SUBWORD_VOCAB = 8000  # bpe / wordpiece when vocab_size is None
META_FILE = "attnlab_tokenizer.json"
LIBRARY_FILE = "tokenizer.json"
_FORMAT = "attnlab-tokenizer"
_PRE_TOKENIZERS = {  # allowed values per kind; the first is the default
    "word": ("whitespace", "whitespace_split"),
    "wordpiece": ("bert", "whitespace_split"),
    "bpe": ("byte_level",),
    "byte": (None,),
    "char": (None,),
}


def _tokenizers():
    """The ``tokenizers`` library, imported only when a library-backed kind is used."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("the 'word', 'bpe' and 'wordpiece' tokenizers need the `tokenizers` "
                          "library; install it with: pip install attnlab[data]") from e
    return tokenizers


class Tokenizer:
    """Text <-> ids. Build one with :func:`train_tokenizer` or :func:`load_tokenizer`."""

    kind: str = ""

    def __init__(self, *, lowercase: bool, pre_tokenizer: str | None):
        self.lowercase = lowercase
        self.pre_tokenizer = pre_tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included: the embedding size a model needs."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; PAD/CLS/BOS/EOS are dropped unless ``skip_special_tokens=False``
        (UNK is always shown, as ``[UNK]``, so a lossy encoding stays visible)."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i == UNK or i >= NUM_SPECIALS]
        return self._decode(ids)

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, id: int) -> str | None:
        raise NotImplementedError

    def get_vocab(self) -> dict[str, int]:
        """token -> id for the whole vocabulary."""
        return {self.id_to_token(i): i for i in range(self.vocab_size)}

    def save(self, directory: str | Path) -> None:
        """Writes ``attnlab_tokenizer.json`` (kind, options, vocab size; the characters of a
        char tokenizer) and, for library kinds, the library's own ``tokenizer.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": _FORMAT, "version": 1, "kind": self.kind, "lowercase": self.lowercase,
                "pre_tokenizer": self.pre_tokenizer, "vocab_size": self.vocab_size,
                "special_tokens": list(SPECIAL_TOKENS), **self._save_extra(directory)}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n",
                                           encoding="utf-8")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"lowercase={self.lowercase}, pre_tokenizer={self.pre_tokenizer!r})")

    # -- for subclasses --
    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _save_extra(self, directory: Path) -> dict:
        return {}

    def _check_ids(self, ids) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids: expected ids in [0, {self.vocab_size}), got {bad[0]}"
                             f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}")
        return out


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: id = byte + 5. Tokens are the character for ASCII bytes, ``<0xHH>``
    for the others."""

    kind = "byte"

    def __init__(self, *, lowercase: bool = False):
        super().__init__(lowercase=lowercase, pre_tokenizer=None)

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIALS + 256

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        return [b + NUM_SPECIALS for b in text.encode("utf-8")]

    def _decode(self, ids: list[int]) -> str:
        # UNK is the only special that can survive here; it has no byte, so show its name.
        parts, run = [], bytearray()
        for i in ids:
            if i >= NUM_SPECIALS:
                run.append(i - NUM_SPECIALS)
            else:
                parts += [run.decode("utf-8", errors="replace"), SPECIAL_TOKENS[i]]
                run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(token)
        if len(token) == 1 and ord(token) < 128:
            return ord(token) + NUM_SPECIALS
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return int(token[3:5], 16) + NUM_SPECIALS
            except ValueError:
                return None
        return None

    def id_to_token(self, id: int) -> str | None:
        if not 0 <= id < self.vocab_size:
            return None
        if id < NUM_SPECIALS:
            return SPECIAL_TOKENS[id]
        b = id - NUM_SPECIALS
        return chr(b) if b < 128 else f"<0x{b:02X}>"


class CharTokenizer(Tokenizer):
    """One id per character seen in training (id = 5 + rank); others map to UNK."""

    kind = "char"

    def __init__(self, chars: list[str], *, lowercase: bool = False):
        super().__init__(lowercase=lowercase, pre_tokenizer=None)
        self.chars = list(chars)
        self._ids = {c: i + NUM_SPECIALS for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIALS + len(self.chars)

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        get = self._ids.get
        return [get(c, UNK) for c in text]

    def _decode(self, ids: list[int]) -> str:
        return "".join(SPECIAL_TOKENS[i] if i < NUM_SPECIALS else self.chars[i - NUM_SPECIALS]
                       for i in ids)

    def token_to_id(self, token: str) -> int | None:
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(token)
        return self._ids.get(token)

    def id_to_token(self, id: int) -> str | None:
        if not 0 <= id < self.vocab_size:
            return None
        return SPECIAL_TOKENS[id] if id < NUM_SPECIALS else self.chars[id - NUM_SPECIALS]

    def _save_extra(self, directory: Path) -> dict:
        return {"chars": self.chars}


class LibraryTokenizer(Tokenizer):
    """word / bpe / wordpiece: a ``tokenizers.Tokenizer`` with the fixed special ids."""

    def __init__(self, kind: str, backend, *, lowercase: bool, pre_tokenizer: str):
        super().__init__(lowercase=lowercase, pre_tokenizer=pre_tokenizer)
        self.kind = kind
        # Not saved in tokenizer.json, so set here: "[CLS]" in a text is text, not CLS.
        backend.encode_special_tokens = True
        self.backend = backend

    def __setstate__(self, state):  # pickling (DataLoader workers) loses that flag too
        self.__dict__.update(state)
        self.backend.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The library's batch path runs in Rust over all texts (in parallel threads).
        return [e.ids for e in self.backend.encode_batch(list(texts))]

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(id)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def _save_extra(self, directory: Path) -> dict:
        self.backend.save(str(directory / LIBRARY_FILE))
        return {}


def _fix_special_ids(backend):
    """Specials at ids 0..4 and the others contiguous after them, keeping their order.

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
        why = "the 5 specials and the 256 bytes" if kind == "bpe" else "the 5 specials and a token"
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
        if list(meta["special_tokens"]) != list(SPECIAL_TOKENS):
            raise ValueError(f"special tokens {meta['special_tokens']} differ from "
                             f"{list(SPECIAL_TOKENS)}")
        if kind == "char":
            chars = meta["chars"]
            if (not isinstance(chars, list) or len(set(chars)) != len(chars)
                    or not all(isinstance(c, str) and len(c) == 1 for c in chars)):
                raise ValueError("'chars' must be a list of distinct single characters")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt tokenizer metadata: {e}", path=meta_path) from e
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer(lowercase=lowercase)
    elif kind == "char":
        tok = CharTokenizer(chars, lowercase=lowercase)
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
                               pre_tokenizer=meta.get("pre_tokenizer"))
        wrong = [t for i, t in enumerate(SPECIAL_TOKENS) if tok.token_to_id(t) != i]
        if wrong:
            raise DataError(f"special tokens {wrong} are not at their fixed ids", path=lib_path)
    if tok.vocab_size != meta.get("vocab_size"):
        raise DataError(f"vocabulary has {tok.vocab_size} ids but the metadata says "
                        f"{meta.get('vocab_size')!r}", path=meta_path)
    return tok
