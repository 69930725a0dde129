"""The tokenizer kinds and their fixed special ids (the public names are re-exported, and
documented, by :mod:`attnlab.data.tokenize`, which trains and loads them)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from attnlab.util.optional import optional_import

__all__ = [
    "BOS", "CLS", "EOS", "KINDS", "LEGACY_SPECIAL_TOKENS", "MASK", "NUM_SPECIALS", "PAD",
    "SPECIAL_TOKENS", "UNK",
    "ByteTokenizer", "CharTokenizer", "LibraryTokenizer", "Tokenizer",
]

PAD, UNK, CLS, BOS, EOS, MASK = 0, 1, 2, 3, 4, 5
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[BOS]", "[EOS]", "[MASK]")
NUM_SPECIALS = len(SPECIAL_TOKENS)
# The specials of tokenizers saved before [MASK] was appended: loaded with these, as saved.
LEGACY_SPECIAL_TOKENS = SPECIAL_TOKENS[:MASK]
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
    return optional_import("tokenizers", extra="data",
                           purpose="the 'word', 'bpe' and 'wordpiece' tokenizers")


class Tokenizer:
    """Text <-> ids. Build one with :func:`train_tokenizer` or :func:`load_tokenizer`."""

    kind: str = ""

    def __init__(self, *, lowercase: bool, pre_tokenizer: str | None,
                 specials: tuple[str, ...] = SPECIAL_TOKENS):
        self.lowercase = lowercase
        self.pre_tokenizer = pre_tokenizer
        self.special_tokens = tuple(specials)  # LEGACY_SPECIAL_TOKENS for an old save
        self.num_specials = len(self.special_tokens)

    @property
    def mask_id(self) -> int | None:
        """The id of ``[MASK]`` (:data:`MASK`), ``None`` for a tokenizer saved without it."""
        return MASK if self.num_specials > MASK else None

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included: the embedding size a model needs."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; PAD/CLS/BOS/EOS/MASK are dropped unless
        ``skip_special_tokens=False`` (UNK is always shown, as ``[UNK]``, so a lossy
        encoding stays visible)."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i == UNK or i >= self.num_specials]
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
                "special_tokens": list(self.special_tokens), **self._save_extra(directory)}
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
    """UTF-8 bytes: id = byte + 6 (+ 5 for one saved before ``[MASK]``). Tokens are the
    character for ASCII bytes, ``<0xHH>`` for the others."""

    kind = "byte"

    def __init__(self, *, lowercase: bool = False, specials: tuple[str, ...] = SPECIAL_TOKENS):
        super().__init__(lowercase=lowercase, pre_tokenizer=None, specials=specials)

    @property
    def vocab_size(self) -> int:
        return self.num_specials + 256

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        n = self.num_specials
        return [b + n for b in text.encode("utf-8")]

    def _decode(self, ids: list[int]) -> str:
        # UNK is the only special that can survive here; it has no byte, so show its name.
        parts, run, n = [], bytearray(), self.num_specials
        for i in ids:
            if i >= n:
                run.append(i - n)
            else:
                parts += [run.decode("utf-8", errors="replace"), self.special_tokens[i]]
                run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens.index(token)
        if len(token) == 1 and ord(token) < 128:
            return ord(token) + self.num_specials
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return int(token[3:5], 16) + self.num_specials
            except ValueError:
                return None
        return None

    def id_to_token(self, id: int) -> str | None:
        if not 0 <= id < self.vocab_size:
            return None
        if id < self.num_specials:
            return self.special_tokens[id]
        b = id - self.num_specials
        return chr(b) if b < 128 else f"<0x{b:02X}>"


class CharTokenizer(Tokenizer):
    """One id per character seen in training (id = 6 + rank; 5 + rank for one saved before
    ``[MASK]``); others map to UNK."""

    kind = "char"

    def __init__(self, chars: list[str], *, lowercase: bool = False,
                 specials: tuple[str, ...] = SPECIAL_TOKENS):
        super().__init__(lowercase=lowercase, pre_tokenizer=None, specials=specials)
        self.chars = list(chars)
        self._ids = {c: i + self.num_specials for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return self.num_specials + len(self.chars)

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        get = self._ids.get
        return [get(c, UNK) for c in text]

    def _decode(self, ids: list[int]) -> str:
        n = self.num_specials
        return "".join(self.special_tokens[i] if i < n else self.chars[i - n] for i in ids)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens.index(token)
        return self._ids.get(token)

    def id_to_token(self, id: int) -> str | None:
        if not 0 <= id < self.vocab_size:
            return None
        n = self.num_specials
        return self.special_tokens[id] if id < n else self.chars[id - n]

    def _save_extra(self, directory: Path) -> dict:
        return {"chars": self.chars}


class LibraryTokenizer(Tokenizer):
    """word / bpe / wordpiece: a ``tokenizers.Tokenizer`` with the fixed special ids."""

    def __init__(self, kind: str, backend, *, lowercase: bool, pre_tokenizer: str,
                 specials: tuple[str, ...] = SPECIAL_TOKENS):
        super().__init__(lowercase=lowercase, pre_tokenizer=pre_tokenizer, specials=specials)
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
