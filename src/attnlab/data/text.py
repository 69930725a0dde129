"""Text datasets from their real files: emotions (dair-ai / Kaggle), IMDB, WikiText-2.

Each loader looks for the files under a data directory (see :mod:`attnlab.data.sources`),
falls back to a Hugging Face download when allowed, and returns a :class:`TextDataset`
whose ``notes`` say everything that was done to the data: which split rule was used,
which rows were skipped or added, and how many train texts were dropped because they
also occur in validation or test (:func:`attnlab.data.splits.drop_leaks`; always applied
to classification data, so no held-out text is ever trained on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.data import sources
from attnlab.data.sources import (
    DataError,
    RowPolicy,
    csv_rows,
    data_root,
    find_files,
    not_found,
    open_text,
    read_text,
)
from attnlab.data.splits import drop_leaks, split_manifest, stratified_split

__all__ = [
    "EMOTION_CLASSES",
    "IMDB_CLASSES",
    "TextDataset",
    "TextSplit",
    "byte_classification",
    "load_emotions",
    "load_imdb",
    "load_wikitext2",
    "wikitext_words",
]

# dair-ai / Hugging Face ids: sadness 0, joy 1, love 2, anger 3, fear 4, surprise 5.
EMOTION_CLASSES = ("sadness", "joy", "love", "anger", "fear", "surprise")
_EMOTION_ALIASES = {"happy": "joy"}  # the Kaggle CSV's name for joy
IMDB_CLASSES = ("negative", "positive")
_IMDB_ALIASES = {"neg": "negative", "pos": "positive"}  # HF and aclImdb folder names

_DAIR_LAYOUT = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
_KAGGLE_CSV = "Emotion_final.csv"
# Emotion_final.csv by data row (README of ../shared/datasets): rows 0-19999 are the
# dair-ai files, in order, train then test then validation; 20000+ come from elsewhere.
KAGGLE_ROWS = {"train": (0, 16000), "test": (16000, 18000), "validation": (18000, 20000)}
_EXTRA_START = 20000


@dataclass(frozen=True)
class TextSplit:
    texts: list[str]
    labels: list[int] | None  # None for language-model text

    def __post_init__(self):
        if self.labels is not None and len(self.labels) != len(self.texts):
            raise ValueError(f"TextSplit: {len(self.labels)} labels for {len(self.texts)} texts")


@dataclass(frozen=True)
class TextDataset:
    name: str                      # "emotions", "imdb", "wikitext2"
    classes: tuple[str, ...]       # label names, index = label id; () for LM
    splits: dict[str, TextSplit]   # keys "train", "validation", "test"
    source: str                    # file paths used, or "hf:<repo>"
    notes: tuple[str, ...] = field(default=())

    def manifest(self) -> dict:
        """Count and SHA-256 of every split's texts (:func:`split_manifest`), for run logs."""
        return split_manifest({k: s.texts for k, s in self.splits.items()})


def _read_dair(path: Path, rows: RowPolicy) -> tuple[list[str], list[int]]:
    """``text;label`` lines, split on the last ';' (no header; a ``text;label`` first line,
    as some copies add, is skipped)."""
    texts, labels = [], []
    for n, line in enumerate(open_text(path), 1):
        body = line.rstrip("\r\n")
        if n == 1 and body.lower() in ("text;label", "text;label_name"):
            continue
        text, sep, name = body.rpartition(";")
        if not body.strip():
            rows.bad("empty line", "empty line; expected 'text;label'", path, n)
        elif not sep:
            rows.bad("no ';'", f"expected 'text;label', found {body[:60]!r}", path, n)
        elif not text.strip():
            rows.bad("empty text", "empty text", path, n)
        elif (label := rows.label(name, path, n)) is not None:
            texts.append(text)
            labels.append(label)
    return texts, labels


def _read_kaggle(path: Path, rows: RowPolicy) -> tuple[list[tuple[int, str, int]], int]:
    """``(data row index, text, label)`` of Emotion_final.csv (header ``Text,Emotion``),
    and the number of data rows (bad ones included: the split is by position)."""
    out, index = [], -1
    for index, (line, cells, width) in enumerate(csv_rows(path, ("Text", "Emotion"))):
        if not cells:
            rows.bad("wrong cell count", f"expected 2 cells (Text, Emotion), found {width}",
                     path, line)
        elif not cells["Text"].strip():
            rows.bad("empty text", "empty text", path, line)
        elif (label := rows.label(cells["Emotion"], path, line)) is not None:
            out.append((index, cells["Text"], label))
    return out, index + 1


def _emotions_from_kaggle(path, rows, notes):
    table, n_rows = _read_kaggle(path, rows)
    if n_rows < _EXTRA_START:
        raise DataError(f"has {n_rows} data rows; the Kaggle Emotion_final.csv (21,459 rows) "
                        f"is split by position (rows 0-{_EXTRA_START - 1} are the dair-ai "
                        "split), which needs at least 20,000", path=path)
    splits = {}
    for name, (a, b) in KAGGLE_ROWS.items():
        part = [(t, y) for i, t, y in table if a <= i < b]
        splits[name] = ([t for t, _ in part], [y for _, y in part])
    notes.append(f"{path.name} only: rows 0-15999 train, 16000-17999 test, 18000-19999 "
                 "validation (the dair-ai split, same order)")
    extra = [(t, y) for i, t, y in table if i >= _EXTRA_START]
    return splits, extra


def _extra_from_kaggle(path, rows, dair, notes):
    """Rows 20000+ of the CSV, after checking its first 20000 rows are the dair-ai files."""
    table, _ = _read_kaggle(path, rows)
    head = [t.strip() for i, t, _ in table if i < _EXTRA_START]
    ours = [t.strip() for s in ("train", "test", "validation") for t in dair[s][0]]
    if not rows.skipped and head != ours:
        pairs = enumerate(zip(head, ours, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(head), len(ours)))
        raise DataError(f"rows 0-19999 should equal the dair-ai train+test+val files but "
                        f"differ at data row {first}; cannot tell which rows are extra "
                        "(use source='dair-ai' or extra_rows='drop')", path=path)
    if rows.skipped:
        notes.append(f"{path.name} not checked against the dair-ai files (rows were skipped)")
    return [(t, y) for i, t, y in table if i >= _EXTRA_START]


def load_emotions(data_dir=None, *, source: str = "auto", extra_rows: str = "train",
                  seed: int = 0, download: bool = True, on_bad: str = "error") -> TextDataset:
    """Six-class emotion classification (Saravia et al. 2018, CARER), dair-ai split.

    ``source``: ``"dair-ai"`` (``train.txt``/``val.txt``/``test.txt``, ``text;label``),
    ``"kaggle"`` (``Emotion_final.csv``: its rows 0-19,999 are the dair-ai split by
    position, rows 20,000+ are 1,459 rows from an undocumented source), ``"hf"``
    (download ``dair-ai/emotion``), or ``"auto"``: the dair-ai files, plus the CSV's extra
    rows when it is also there; either file set alone; else a download. ``extra_rows``:
    ``"train"`` adds the CSV's extra rows to train, ``"drop"`` leaves them out (noted
    either way). Labels follow the dair-ai/HF ids (:data:`EMOTION_CLASSES`). ``seed`` is
    unused (every split here is fixed) and kept for a uniform loader signature.
    """
    del seed
    if source not in ("auto", "dair-ai", "kaggle", "hf"):
        raise ValueError(f"source must be 'auto', 'dair-ai', 'kaggle' or 'hf', got {source!r}")
    if extra_rows not in ("train", "drop"):
        raise ValueError(f"extra_rows must be 'train' or 'drop', got {extra_rows!r}")
    rows = RowPolicy(on_bad, EMOTION_CLASSES, _EMOTION_ALIASES)
    root = data_root(data_dir) if source != "hf" else None
    tried: list[tuple[Path, str]] = []
    notes: list[str] = []
    dair = csv_ = None
    if source in ("auto", "dair-ai"):
        dair = find_files("emotions", _DAIR_LAYOUT, root, tried=tried)
    if source == "kaggle" or (source == "auto" and (dair is None or extra_rows == "train")):
        csv_ = find_files("emotions", {"csv": _KAGGLE_CSV}, root, tried=tried)
    extra: list[tuple[str, int]] = []
    if dair is not None:
        splits = {s: _read_dair(p, rows) for s, p in dair.items()}
        used = list(dair.values())
        notes.append("dair-ai split files (train.txt, val.txt, test.txt)")
        if csv_ is not None:
            extra = _extra_from_kaggle(csv_["csv"], rows, splits, notes)
            used.append(csv_["csv"])
    elif csv_ is not None:
        splits, extra = _emotions_from_kaggle(csv_["csv"], rows, notes)
        used = [csv_["csv"]]
    elif source in ("auto", "hf"):
        data = sources.hf_fetch("emotions", tried, download, sources.hf_emotions)
        used = [f"hf:{sources.HF_REPOS['emotions'][0]}"]
        splits = {s: _from_names(t, names, rows, f"{used[0]}/{s}")
                  for s, (t, names) in data.items()}
        notes.append("downloaded dair-ai/emotion (split config); it has no extra rows")
    else:
        raise not_found("emotions", tried, f"source={source!r} reads local files only")
    if csv_ is None and dair is not None:
        why = ("extra_rows='drop'" if extra_rows == "drop" else "source='dair-ai'"
               if source == "dair-ai" else f"{_KAGGLE_CSV} (which holds them) not found")
        notes.append(f"no extra rows: {why}")
    if csv_ is not None:
        if extra_rows == "train":
            splits["train"] = (splits["train"][0] + [t for t, _ in extra],
                               splits["train"][1] + [y for _, y in extra])
            notes.append(f"added {len(extra)} extra rows ({_KAGGLE_CSV} rows 20000+, an "
                         "undocumented source, often cut mid-word) to train")
        else:
            notes.append(f"left out {len(extra)} extra rows ({_KAGGLE_CSV} rows 20000+, "
                         "extra_rows='drop')")
        notes.append(f"{_KAGGLE_CSV}: label 'happy' read as 'joy'")
    return _finish("emotions", EMOTION_CLASSES, splits, used, notes + rows.notes())


def _from_names(texts, names, rows: RowPolicy, where: str) -> tuple[list[str], list[int]]:
    """Downloaded rows with label names mapped to our ids (a bad one raises or is skipped)."""
    pairs = [(t, rows.label(n, where, i + 1))
             for i, (t, n) in enumerate(zip(texts, names, strict=True))]
    pairs = [(t, y) for t, y in pairs if y is not None]
    return [t for t, _ in pairs], [y for _, y in pairs]


def _finish(name, classes, splits, used, notes) -> TextDataset:
    """Drop held-out texts from train, note the count and any validation/test overlap."""
    val, test = splits["validation"][0], splits["test"][0]
    texts, labels, dropped = drop_leaks(*splits["train"], val, test)
    notes.append(f"dropped {dropped} train rows whose text (stripped) is also in validation "
                 "or test")
    both = {t.strip() for t in val} & {t.strip() for t in test}
    if both:
        notes.append(f"{len(both)} texts are in both validation and test (kept as in the "
                     "source)")
    out = {"train": TextSplit(texts, labels)}
    out.update({s: TextSplit(*splits[s]) for s in ("validation", "test")})
    return TextDataset(name, classes, out, ", ".join(str(p) for p in used), tuple(notes))


_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_ACL_LAYOUT = {"train_pos": "train/pos/", "train_neg": "train/neg/",
               "test_pos": "test/pos/", "test_neg": "test/neg/"}
_IMDB_CSVS = [{"csv": "imdb_aclImdb_v1.csv"}, {"csv": "IMDB Dataset.csv"}]
_ACL_NAME = re.compile(r"^(\d+)_(\d+)\.txt$")


def _read_acl(folders: dict[str, Path]) -> dict[str, tuple[list[str], list[int]]]:
    """aclImdb ``<split>/<pos|neg>/<id>_<rating>.txt``, each folder in id order."""
    out: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for role, folder in folders.items():
        split, label = role.split("_")
        files = sorted(folder.glob("*.txt"), key=lambda p: (
            (0, int(m.group(1)), "") if (m := _ACL_NAME.match(p.name)) else (1, 0, p.name)))
        if not files:
            raise DataError("no review files (*.txt) in this folder", path=folder)
        out[split][0].extend(read_text(p) for p in files)
        out[split][1].extend([IMDB_CLASSES.index(_IMDB_ALIASES[label])] * len(files))
    return out


def _read_imdb_csv(path: Path, rows: RowPolicy):
    splits: dict[str, tuple[list[str], list[int]]] = {}
    has_split = False
    for line, cells, width in csv_rows(path, ("review", "sentiment"), optional=("split",)):
        if not cells:
            rows.bad("wrong cell count", f"expected one cell per header column, found "
                     f"{width}", path, line)
            continue
        has_split = "split" in cells
        split = cells["split"].strip() if has_split else "all"
        if split not in (("train", "test") if has_split else ("all",)):
            rows.bad("unknown split", f"unknown split {split!r}; expected 'train' or 'test'",
                     path, line)
        elif not cells["review"].strip():
            rows.bad("empty text", "empty review", path, line)
        elif (label := rows.label(cells["sentiment"], path, line)) is not None:
            texts, labels = splits.setdefault(split, ([], []))
            texts.append(cells["review"])
            labels.append(label)
    return splits, has_split


def load_imdb(data_dir=None, *, seed: int = 0, validation_fraction: float = 0.1,
              clean_html: bool = True, download: bool = True,
              on_bad: str = "error") -> TextDataset:
    """IMDB sentiment (Maas et al. 2011), classes ``("negative", "positive")``.

    Files, in order of preference: the ``aclImdb/`` folder (``train|test/pos|neg/
    <id>_<rating>.txt``; ``unsup`` ignored), ``imdb_aclImdb_v1.csv`` (with a ``split``
    column: the official 25k/25k split), the Kaggle ``IMDB Dataset.csv`` (``review,
    sentiment``; no split column, so a seeded stratified 25k/25k train/test split is
    drawn, as noted), each CSV also as ``.gz``; else a ``stanfordnlp/imdb`` download.
    Validation is a seeded stratified ``validation_fraction`` of train. ``clean_html``
    turns ``<br />`` tags into spaces.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    rows = RowPolicy(on_bad, IMDB_CLASSES, _IMDB_ALIASES)
    root = data_root(data_dir)
    tried: list[tuple[Path, str]] = []
    notes: list[str] = []
    if (folders := find_files("imdb", _ACL_LAYOUT, root, tried=tried)) is not None:
        splits = _read_acl(folders)
        used = [folders["train_pos"].parent.parent]
        notes.append("aclImdb folder: official 25k/25k train/test split")
    elif (found := find_files("imdb", _IMDB_CSVS, root, tried=tried)) is not None:
        splits, has_split = _read_imdb_csv(found["csv"], rows)
        used = [found["csv"]]
        if has_split:
            notes.append("CSV 'split' column: official 25k/25k train/test split")
        else:
            texts, labels = splits.pop("all", ([], []))
            idx = stratified_split(labels, {"train": 0.5, "test": 0.5}, seed)
            splits = {s: ([texts[i] for i in ix], [labels[i] for i in ix])
                      for s, ix in idx.items()}
            notes.append(f"no split column: seeded (seed={seed}) stratified 50/50 train/test "
                         "split (not the official one)")
    else:
        data = sources.hf_fetch("imdb", tried, download, sources.hf_imdb)
        used = [f"hf:{sources.HF_REPOS['imdb'][0]}"]
        splits = {s: _from_names(t, names, rows, f"{used[0]}/{s}")
                  for s, (t, names) in data.items()}
        notes.append("downloaded stanfordnlp/imdb: official 25k/25k train/test split")
    for s in ("train", "test"):
        if not splits.get(s, ([], []))[0]:
            raise DataError(f"imdb: the {s!r} split is empty", path=used[0])
    if clean_html:
        splits = {s: ([_BR.sub(" ", t) for t in texts], labels)
                  for s, (texts, labels) in splits.items()}
        notes.append("<br /> tags replaced by spaces")
    texts, labels = splits["train"]
    if validation_fraction > 0:
        idx = stratified_split(labels, {"train": 1 - validation_fraction,
                                        "validation": validation_fraction}, seed)
        splits["train"] = ([texts[i] for i in idx["train"]], [labels[i] for i in idx["train"]])
        splits["validation"] = ([texts[i] for i in idx["validation"]],
                                [labels[i] for i in idx["validation"]])
        notes.append(f"validation: seeded (seed={seed}) stratified {validation_fraction:g} "
                     "of train")
    else:
        splits["validation"] = ([], [])
        notes.append("validation: none (validation_fraction=0)")
    return _finish("imdb", IMDB_CLASSES, splits, used, notes + rows.notes())


_WIKI_LAYOUTS = [
    {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens", "test": "wiki.test.tokens"},
    {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"},
    {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"},
]


def load_wikitext2(data_dir=None, *, download: bool = True) -> TextDataset:
    """WikiText-2 (Merity et al. 2016) for language modelling.

    Files: ``wiki.{train,valid,test}.tokens`` or ``{train,valid,test}.txt`` (the tokenized
    v1 text, as pytorch/examples keeps it) or the raw ``wiki.*.raw``, plain or ``.gz``;
    else a ``Salesforce/wikitext`` (wikitext-2-v1) download. Each split's ``texts`` is a
    list holding ONE string, the whole file; ``labels`` is ``None``. Split it into words
    with :func:`wikitext_words`.
    """
    root = data_root(data_dir)
    tried: list[tuple[Path, str]] = []
    found = find_files("wikitext2", _WIKI_LAYOUTS, root, tried=tried)
    if found is not None:
        text = {s: read_text(p) for s, p in found.items()}
        used: list = list(found.values())
        raw = found["train"].name.startswith("wiki.train.raw")
        notes = ["raw (untokenized) text" if raw else "tokenized v1 text"]
    else:
        text = sources.hf_fetch("wikitext2", tried, download, sources.hf_wikitext2)
        used = [f"hf:{sources.HF_REPOS['wikitext2'][0]}"]
        notes = ["downloaded Salesforce/wikitext wikitext-2-v1 (blank lines restored)"]
    splits = {s: TextSplit([text[s]], None) for s in ("train", "validation", "test")}
    return TextDataset("wikitext2", (), splits, ", ".join(str(p) for p in used), tuple(notes))


def wikitext_words(text: str) -> list[str]:
    """Words as pytorch/examples ``word_language_model`` counts them: for every line,
    ``line.split()`` then ``"<eos>"`` (blank lines give a lone ``"<eos>"``). Lines end at
    ``\\n`` only, as when iterating the file."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the text's final newline ends the last line; it opens no new one
    words: list[str] = []
    for line in lines:
        words.extend(line.split())
        words.append("<eos>")
    return words


def byte_classification(dataset: TextDataset, max_bytes: int) -> TextDataset:
    """A classification dataset cut to at most ``max_bytes`` UTF-8 bytes per text, for
    LRA "Text"-style byte-level tasks (Tay et al. 2021 use 4K bytes of IMDB).

    Texts stay ``str``: ``text.encode("utf-8")`` gives the byte sequence a byte-level
    model reads (at most ``max_bytes``). The cut is on a character boundary: bytes are
    truncated, then decoded with ``errors="ignore"``, which can only drop the partial
    character at the cut. Same splits, labels and classes; the truncated count is noted.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
    if not dataset.classes or any(s.labels is None for s in dataset.splits.values()):
        raise ValueError(f"byte_classification needs a labelled dataset, got {dataset.name!r} "
                         "(no labels)")
    cut = 0
    splits = {}
    for name, split in dataset.splits.items():
        texts = []
        for t in split.texts:
            b = t.encode("utf-8")
            if len(b) > max_bytes:
                cut += 1
                t = b[:max_bytes].decode("utf-8", errors="ignore")
            texts.append(t)
        splits[name] = TextSplit(texts, list(split.labels))
    total = sum(len(s.texts) for s in splits.values())
    note = f"UTF-8 bytes: {cut} of {total} texts truncated to {max_bytes} bytes"
    return TextDataset(dataset.name, dataset.classes, splits, dataset.source,
                       dataset.notes + (note,))
