"""Parallel corpora for translation: number names (num2words, offline) and WMT14 files.

* :func:`num2words_corpus` -- every number of a range written out in two languages by
  ``num2words`` (Savoir-faire Linux), e.g. ``"einundzwanzig" -> "twenty-one"``: real words,
  generated offline and seeded. It is a small real translation problem with compositional
  structure: German names units before tens in one word (``einund|zwanzig``), English tens
  before units in words joined by hyphens, commas and ``"and"``; French counts in twenties
  (``quatre-vingt-dix-sept`` = 4 x 20 + 17). The train, validation and test splits hold
  *disjoint numbers*, so a model is scored on numbers it never saw.
* :func:`load_wmt14` -- WMT14 (Bojar et al. 2014) in the Hugging Face ``datasets`` layout:
  rows with a ``translation`` column of dicts ``{"de": ..., "en": ...}``, as the hub's
  parquet files (``de-en/train-00000-of-00003.parquet``, ``validation-...``, ``test-...``)
  or JSON lines (``train.jsonl``, one ``{"translation": {...}}`` a line, also ``.gz``).
  Nothing is downloaded: a missing file is a :class:`DataError` listing every path tried.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnlab.data.sources import DataError, data_root, not_found, open_text
from attnlab.util.checks import check_choice, check_int, did_you_mean
from attnlab.util.optional import optional_import

__all__ = ["FORMS", "SPLITS", "WMT14_PAIRS", "ParallelCorpus", "ParallelSplit",
           "load_wmt14", "num2words_corpus", "num2words_languages"]

SPLITS = ("train", "validation", "test")
FORMS = ("cardinal", "ordinal", "year")  # num2words' ``to=`` values offered here
WMT14_PAIRS = ("cs-en", "de-en", "fr-en", "hi-en", "ru-en")  # the hub's configurations


@dataclass(frozen=True)
class ParallelSplit:
    src: list[str]
    tgt: list[str]
    keys: list | None = None  # what each pair renders (num2words: the number), else None

    def __post_init__(self):
        if len(self.src) != len(self.tgt):
            raise ValueError(f"ParallelSplit: {len(self.src)} sources for {len(self.tgt)} "
                             "targets")


@dataclass(frozen=True)
class ParallelCorpus:
    name: str                          # "num2words" or "wmt14"
    src_lang: str
    tgt_lang: str
    splits: dict[str, ParallelSplit]   # "train", "validation", "test"
    source: str                        # files read, or how it was generated
    notes: tuple[str, ...] = field(default=())


# --- num2words -------------------------------------------------------------------------

def _num2words():
    return optional_import("num2words", extra="translation", purpose="the num2words corpus")


def num2words_languages() -> list[str]:
    """The language codes ``num2words`` knows (``"de"``, ``"en"``, ``"fr"``, ...)."""
    return sorted(_num2words().CONVERTER_CLASSES)


def _render(n: int, lang: str, form: str) -> str:
    try:
        return _num2words().num2words(n, lang=lang, to=form)
    except (NotImplementedError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"num2words_corpus: num2words cannot write {n} as a {form!r} in "
                         f"language {lang!r} ({type(e).__name__}: {e}); choose another form "
                         f"or number range") from e


def _check_forms(forms) -> tuple[str, ...]:
    if isinstance(forms, str):
        forms = tuple(f.strip() for f in forms.split(","))
    if not isinstance(forms, (list, tuple)) or not forms:
        raise TypeError(f"num2words_corpus: forms must be a non-empty list of {FORMS} (or one "
                        f"comma-separated string of them); got {forms!r}")
    for f in forms:
        check_choice("forms", f, FORMS, who="num2words_corpus")
    if len(set(forms)) != len(forms):
        raise ValueError(f"num2words_corpus: forms has repeats; got {list(forms)}")
    return tuple(forms)


def num2words_corpus(src_lang: str = "de", tgt_lang: str = "en", *, min_number: int = 0,
                     max_number: int = 9999, n_train: int | None = None,
                     n_validation: int = 500, n_test: int = 500,
                     forms=("cardinal",), seed: int = 0) -> ParallelCorpus:
    """Numbers ``min_number .. max_number`` (inclusive) written in ``src_lang`` and
    ``tgt_lang``, each number in every one of ``forms`` (``"cardinal"`` 21, ``"ordinal"``
    21st, ``"year"`` 1987), the two sides always in the same form.

    The numbers are shuffled by ``numpy.random.default_rng(seed)``; the first ``n_test``
    are test, the next ``n_validation`` validation, and ``n_train`` of the rest (``None``:
    all of them) train, so no number is in two splits. Each split's ``keys`` are its
    numbers (one per pair, ``len(forms)`` pairs a number). Deterministic: the same
    arguments give the same corpus, byte for byte.
    """
    who = "num2words_corpus"
    langs = num2words_languages()
    for name, lang in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
        if not isinstance(lang, str) or lang not in langs:
            raise ValueError(f"{who}: {name} must be a language num2words knows "
                             f"({', '.join(langs)}); got {lang!r}{did_you_mean(lang, langs)}")
    if src_lang == tgt_lang:
        raise ValueError(f"{who}: src_lang and tgt_lang must differ; both are {src_lang!r}")
    min_number = check_int("min_number", min_number, low=0, who=who)
    max_number = check_int("max_number", max_number, low=min_number, who=who)
    n_validation = check_int("n_validation", n_validation, low=1, who=who)
    n_test = check_int("n_test", n_test, low=1, who=who)
    n_train = check_int("n_train", n_train, low=1, nullable=True, who=who)
    seed = check_int("seed", seed, low=0, who=who)
    forms = _check_forms(forms)
    total = max_number - min_number + 1
    need = n_validation + n_test + (n_train or 1)
    if need > total:
        raise ValueError(f"{who}: the range {min_number}..{max_number} holds {total} numbers, "
                         f"fewer than n_test + n_validation + n_train = {need}")
    order = np.random.default_rng(seed).permutation(total) + min_number
    cut = {"test": order[:n_test], "validation": order[n_test:n_test + n_validation]}
    rest = order[n_test + n_validation:]
    cut["train"] = rest if n_train is None else rest[:n_train]
    splits, seen = {}, {}
    for s in SPLITS:
        src, tgt, keys = [], [], []
        for n in cut[s].tolist():
            for form in forms:
                src.append(_render(n, src_lang, form))
                tgt.append(_render(n, tgt_lang, form))
                keys.append(n)
                seen.setdefault(src[-1], set()).add(tgt[-1])
        splits[s] = ParallelSplit(src, tgt, keys)
    notes = [f"num2words {src_lang}->{tgt_lang}, forms {list(forms)}, numbers "
             f"{min_number}..{max_number} shuffled with seed {seed}; splits hold disjoint "
             f"numbers ({', '.join(f'{s} {len(cut[s])}' for s in SPLITS)})"]
    ambiguous = sum(len(t) > 1 for t in seen.values())
    if ambiguous:  # e.g. one source string for two forms that differ in the target
        notes.append(f"{ambiguous} source texts have more than one target (across forms)")
    return ParallelCorpus("num2words", src_lang, tgt_lang, splits,
                          f"num2words {_num2words().__name__} (generated)", tuple(notes))


# --- WMT14 -----------------------------------------------------------------------------

def _split_patterns(split: str) -> list[tuple[str, str]]:
    """``(format, glob)`` for the files of ``split``, preferred first: the hub's parquet
    shards, then JSON lines (one file or shards, plain or gzip)."""
    return [("parquet", f"{split}-*.parquet"), ("parquet", f"{split}.parquet"),
            ("jsonl", f"{split}.jsonl"), ("jsonl", f"{split}.jsonl.gz"),
            ("jsonl", f"{split}-*.jsonl"), ("jsonl", f"{split}-*.jsonl.gz")]


def _find_split(folder: Path, split: str, tried: list) -> tuple[str, list[Path]] | None:
    for fmt, pattern in _split_patterns(split):
        tried.append((folder, pattern))
        files = sorted(p for p in folder.glob(pattern) if p.is_file())
        if files:
            return fmt, files
    return None


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    pq = optional_import("pyarrow.parquet", extra="data", dist="pyarrow",
                         purpose="reading parquet files")
    try:
        f = pq.ParquetFile(path)
        if "translation" not in f.schema_arrow.names:
            raise DataError(f"no 'translation' column; found columns {f.schema_arrow.names}",
                            path=path)
        row = 0
        for batch in f.iter_batches(columns=["translation"], batch_size=4096):
            for value in batch.column(0).to_pylist():
                row += 1
                yield row, value
    except OSError as e:  # pyarrow's ArrowInvalid (a corrupt file) is an OSError too
        raise DataError(f"cannot read parquet file: {e}", path=path) from e


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    for line_no, line in enumerate(open_text(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e.msg}", path=path, line=line_no) from e
        if not isinstance(row, dict) or "translation" not in row:
            raise DataError(f"expected an object with a 'translation' key; found "
                            f"{line.strip()[:80]!r}", path=path, line=line_no)
        yield line_no, row["translation"]


def _read_split(fmt: str, files: list[Path], langs: tuple[str, str], max_rows: int | None
                ) -> tuple[list[str], list[str], int]:
    """Source and target texts of one split's files, in file order, and the number of rows
    skipped because a side was empty."""
    a, b = langs
    src, tgt, empty = [], [], 0
    read = _parquet_rows if fmt == "parquet" else _jsonl_rows
    for path in files:
        for where, pair in read(path):
            if max_rows is not None and len(src) >= max_rows:
                return src, tgt, empty
            if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str)
                                                     for k in langs):
                kind = "row" if fmt == "parquet" else "line"
                raise DataError(f"{kind} {where}: 'translation' must map {a!r} and {b!r} to "
                                f"strings; found {str(pair)[:80]!r}", path=path)
            if not pair[a].strip() or not pair[b].strip():
                empty += 1
                continue
            src.append(pair[a].strip())
            tgt.append(pair[b].strip())
    return src, tgt, empty


def _wmt14_dirs(root: Path, pair: str) -> list[Path]:
    return [root / "wmt14" / pair, root / "wmt" / "wmt14" / pair, root / pair,
            root / "wmt14", root]


def load_wmt14(data_dir: str | os.PathLike | None = None, pair: str = "de-en", *,
               src_lang: str | None = None, max_rows: int | None = None) -> ParallelCorpus:
    """WMT14 ``pair`` (e.g. ``"de-en"``) from local files in the Hugging Face layout.

    Folders tried under the data directory (``data_dir``, else ``$ATTNLAB_DATA``):
    ``wmt14/<pair>/``, ``wmt/wmt14/<pair>/``, ``<pair>/``, ``wmt14/``, the root; the first
    holding all three splits is read. Per split: ``<split>-*.parquet`` shards (the hub's;
    ``pyarrow`` reads them), ``<split>.parquet``, ``<split>.jsonl[.gz]`` or
    ``<split>-*.jsonl[.gz]``. ``src_lang`` (default: the pair's first language) is
    translated into the other. ``max_rows`` keeps the first rows of each split (WMT14 de-en
    train has 4.5M). Rows with an empty side are skipped (noted); texts are stripped.
    """
    who = "load_wmt14"
    if not isinstance(pair, str) or len(pair.split("-")) != 2 or not all(pair.split("-")):
        raise ValueError(f"{who}: pair must be two language codes joined by '-', e.g. "
                         f"'de-en'; got {pair!r}{did_you_mean(pair, WMT14_PAIRS)}")
    langs = tuple(pair.split("-"))
    src_lang = langs[0] if src_lang is None else src_lang
    if src_lang not in langs:
        raise ValueError(f"{who}: src_lang must be one of the pair {pair!r}'s languages "
                         f"{list(langs)}; got {src_lang!r}")
    tgt_lang = langs[1] if src_lang == langs[0] else langs[0]
    max_rows = check_int("max_rows", max_rows, low=1, nullable=True, who=who)
    root = data_root(data_dir)
    tried: list[tuple[Path, str]] = []
    found = None
    for folder in (_wmt14_dirs(root, pair) if root is not None else []):
        if not folder.is_dir():
            tried.append((folder, "(no such folder)"))
            continue
        hits = {s: _find_split(folder, s, tried) for s in SPLITS}
        if all(hits.values()):
            found = hits
            break
    if found is None:
        raise not_found(f"wmt14 {pair}", tried, "attnlab reads WMT14 from local files only "
                        "(the hub's wmt/wmt14 parquet files, or JSON lines)")
    splits, notes, used = {}, [], []
    for s, (fmt, files) in found.items():
        src, tgt, empty = _read_split(fmt, files, (src_lang, tgt_lang), max_rows)
        if not src:
            raise DataError(f"wmt14 {pair}: the {s!r} split has no usable rows", path=files[0])
        splits[s] = ParallelSplit(src, tgt)
        used += files
        if empty:
            notes.append(f"{s}: skipped {empty} rows with an empty side")
    if max_rows is not None:
        notes.append(f"first {max_rows} rows of each split at most (max_rows)")
    notes.insert(0, f"wmt14 {pair} ({found['train'][0]} files), {src_lang}->{tgt_lang}")
    return ParallelCorpus("wmt14", src_lang, tgt_lang, splits,
                          ", ".join(str(p) for p in used), tuple(notes))
