"""Where dataset files come from: a data directory, a system location, or the Hugging Face Hub.

Every loader in :mod:`attnlab.data.text` and :mod:`attnlab.data.images` resolves its
files the same way:

1. :func:`data_root` -- the ``data_dir`` argument, else the ``ATTNLAB_DATA`` environment
   variable, else none.
2. :func:`find_files` -- under that root, ``<root>/<subdir>/<name>`` for a few
   conventional subdirectory names of the dataset (``SUBDIRS``), then ``<root>/<name>``;
   each name is also accepted with ``.gz``. Every path tried is recorded, so the final
   error (:func:`not_found`) can list them all.
3. The ``hf_*`` functions -- download with the Hugging Face ``datasets`` library (imported
   only there, so it is an optional dependency) and map its columns to ours.

Reading is strict: :func:`open_text` and :func:`read_text` decode UTF-8 without
replacement, and a bad byte becomes a :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import gzip
import os
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from attnlab.util.optional import optional_import

__all__ = [
    "ENV_VAR",
    "HF_REPOS",
    "SUBDIRS",
    "DataError",
    "RowPolicy",
    "csv_rows",
    "data_root",
    "find_files",
    "hf_fetch",
    "hf_emotions",
    "hf_imdb",
    "hf_images",
    "hf_wikitext2",
    "not_found",
    "open_text",
    "read_bytes",
    "read_text",
]

ENV_VAR = "ATTNLAB_DATA"

# Conventional folder names per dataset, tried in this order under the data root (the root
# itself is tried last). The first names are those of ../shared/datasets.
SUBDIRS: dict[str, tuple[str, ...]] = {
    "emotions": ("emotion-dair-ai", "emotions", "emotion", "dair-ai-emotion"),
    "imdb": ("imdb", "aclImdb", "IMDB", "imdb/aclImdb", "IMDB/aclImdb"),
    "wikitext2": ("wikitext-2", "wikitext2", "wikitext-2-v1", "wikitext-2-raw",
                  "wikitext-2-raw-v1"),
    "mnist": ("mnist", "MNIST", "MNIST/raw", "mnist/raw"),
    "fashion": ("fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw",
                "fashion"),
}

# (repository, configuration) passed to ``datasets.load_dataset``.
HF_REPOS: dict[str, tuple[str, str | None]] = {
    "emotions": ("dair-ai/emotion", "split"),
    "imdb": ("stanfordnlp/imdb", None),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-v1"),
    "mnist": ("ylecun/mnist", None),
    "fashion": ("zalando-datasets/fashion_mnist", None),
}


class DataError(ValueError):
    """A problem with data files or their content, formatted ``"path:line: message"``."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 line: int | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
            where += ": "
        super().__init__(where + message)


def data_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory: ``data_dir``, else ``$ATTNLAB_DATA``, else ``None``.

    A directory that is given but does not exist is an error (naming where it came from)
    rather than a silent fall-through to a download.
    """
    if data_dir is not None:
        path, origin = Path(data_dir).expanduser(), "the data_dir argument"
    elif os.environ.get(ENV_VAR):
        path, origin = Path(os.environ[ENV_VAR]).expanduser(), f"environment variable {ENV_VAR}"
    else:
        return None
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DataError(f"data directory {str(path)!r} (from {origin}) {what}")
    return path


def _variants(path: Path) -> tuple[Path, ...]:
    """``path`` and its gzip twin (``x`` and ``x.gz``, whichever way it is spelt)."""
    if path.name.endswith(".gz"):
        return (path, path.with_name(path.name[:-3]))
    return (path, path.with_name(path.name + ".gz"))


def find_files(dataset: str, candidates: Mapping[str, str] | Sequence[Mapping[str, str]],
               data_dir: str | os.PathLike | None = None, *,
               subdirs: Sequence[str] | None = None, extra_dirs: Sequence[Path] = (),
               tried: list[tuple[Path, str]] | None = None) -> dict[str, Path] | None:
    """The first complete set of ``dataset``'s files, as ``{role: path}``, or ``None``.

    ``candidates`` is one layout ``{role: file name}`` or a sequence of alternative layouts
    (e.g. ``wiki.train.tokens`` vs ``train.txt``); every role of a layout must be found in
    the same directory. A name ending in ``/`` must be a directory; any other name is a
    file, found as given or with ``.gz`` added. Directories tried, in order:
    ``<root>/<subdir>`` for each of ``subdirs`` (default ``SUBDIRS[dataset]``), ``<root>``,
    then ``extra_dirs`` (e.g. a system location). Every ``(folder, name)`` looked at is
    appended to ``tried``, so the caller's final error (:func:`not_found`) can list them.
    """
    layouts = [candidates] if isinstance(candidates, Mapping) else list(candidates)
    if not layouts or any(not layout for layout in layouts):
        raise ValueError(f"candidates must hold at least one non-empty layout, got {candidates!r}")
    root = data_root(data_dir)
    dirs: list[Path] = []
    if root is not None:
        names = SUBDIRS.get(dataset, ()) if subdirs is None else subdirs
        dirs += [root / s for s in names] + [root]
    dirs += [Path(d) for d in extra_dirs]
    for folder in dirs:
        for layout in layouts:
            if tried is not None:
                tried.extend((folder, name) for name in layout.values())
            found: dict[str, Path] = {}
            for role, name in layout.items():
                path = folder / name.rstrip("/")
                if name.endswith("/"):
                    hit = path if path.is_dir() else None
                else:
                    hit = next((p for p in _variants(path) if p.is_file()), None)
                if hit is None:
                    break
                found[role] = hit
            else:
                return found
    return None


def not_found(dataset: str, tried: Sequence[tuple[Path, str]], reason: str) -> DataError:
    """The error for "no files and no download": every path tried, and why not downloaded.

    ``tried`` holds ``(folder, name)`` pairs as :func:`find_files` records them; they are
    listed one folder a line (``folder/: name, name, ...``) to keep the message readable.
    """
    by_dir: dict[Path, list[str]] = {}
    for folder, name in tried:
        names = by_dir.setdefault(folder, [])
        if name not in names:
            names.append(name)
    listing = "\n  ".join(f"{d}{os.sep}: {', '.join(n)}" for d, n in by_dir.items())
    return DataError(
        f"{dataset}: no data files found. Paths tried (files also as .gz):\n  "
        f"{listing or '(no folder searched: no data directory given)'}\nNot downloaded: {reason}\n"
        f"Pass data_dir=... or set {ENV_VAR} to a folder holding the files.")


def hf_fetch(dataset: str, tried: Sequence[tuple[Path, str]], allowed: bool, fetch, *args,
             hint: str = ""):
    """``fetch(*args)`` (an ``hf_*`` function) after nothing was found locally; when that
    is not allowed or fails, the error lists every path tried and why (plus ``hint``)."""
    if not allowed:
        raise not_found(dataset, tried, "download=False" + hint)
    try:
        return fetch(*args)
    except DataError as e:
        raise not_found(dataset, tried, e.message + hint) from e


def read_bytes(path: str | os.PathLike) -> bytes:
    """The content of a file, gunzipped when it starts with the gzip magic bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"corrupt or truncated gzip file ({e})", path=path) from e
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", path=path) from e


def _decode_error(path: Path, data: bytes, err: UnicodeDecodeError,
                  first_line: int = 1) -> DataError:
    line = first_line + data.count(b"\n", 0, err.start)
    bad = data[err.start:err.end]
    return DataError(f"not valid UTF-8: byte(s) {bad!r} ({err.reason})", path=path, line=line)


def read_text(path: str | os.PathLike) -> str:
    """The whole file (plain or gzip) as a string, decoded as strict UTF-8.

    Decoding all at once is fast; on failure the offset of the bad byte gives its line.
    """
    path = Path(path)
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _decode_error(path, data, e) from None


def open_text(path: str | os.PathLike) -> Iterator[str]:
    """The lines of a plain or gzip text file, decoded as strict UTF-8, endings kept.

    Lines are split on ``\\n`` only, so a ``\\r\\n`` ending stays with its line: this is
    what ``csv.reader`` needs (the same as ``open(..., newline='')``), quoted cells with
    embedded newlines included. A bad byte raises :class:`DataError` with its line.
    """
    path = Path(path)
    data = read_bytes(path)
    start, number = 0, 1
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end + 1
        raw = data[start:end]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _decode_error(path, raw, e, first_line=number) from None
        start, number = end, number + 1


# --- row-level reading shared by the loaders ---------------------------------------------

class RowPolicy:
    """What to do with a bad row (``on_bad``): ``"error"`` raises :class:`DataError` at its
    file and line, ``"skip"`` counts it by kind for the notes. Also maps label names
    (through ``aliases``) to ids, the index in ``classes``."""

    def __init__(self, on_bad: str, classes: tuple[str, ...], aliases: Mapping[str, str]):
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        self.on_bad, self.classes, self.aliases = on_bad, tuple(classes), dict(aliases)
        self.skipped: Counter[str] = Counter()

    def bad(self, kind: str, message: str, path: Path | str, line: int) -> None:
        if self.on_bad == "error":
            raise DataError(f"{message} (pass on_bad='skip' to skip such rows)", path=path,
                            line=line)
        self.skipped[kind] += 1

    def label(self, name: str, path: Path | str, line: int) -> int | None:
        """The id of label ``name``; ``None`` when it is unknown and skipped."""
        name = name.strip()
        name = self.aliases.get(name, name)
        if name in self.classes:
            return self.classes.index(name)
        self.bad("unknown label", f"unknown label {name!r}; expected one of "
                 f"{self.classes} (or {sorted(self.aliases)})", path, line)
        return None

    def notes(self) -> list[str]:
        if not self.skipped:
            return []
        return [f"skipped {sum(self.skipped.values())} bad rows (on_bad='skip'): "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))]


def csv_rows(path: Path, columns: Sequence[str], optional: Sequence[str] = ()
             ) -> Iterator[tuple[int, dict[str, str] | None, int]]:
    """``(line, {column: cell} or None, cell count)`` for each data row of a CSV file.

    The header must hold ``columns`` (case-insensitive, any order; ``optional`` ones are
    used when present), else a :class:`DataError` names the expected and found columns.
    A row whose cell count differs from the header's gives ``None`` (the caller decides).
    ``line`` is the physical line where the row ends.
    """
    reader = csv.reader(open_text(path))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"empty file; expected a header with columns {list(columns)}",
                            path=path)
        names = [h.strip().lstrip("\ufeff").lower() for h in header]
        if any(c.lower() not in names for c in columns):
            raise DataError(f"expected columns {list(columns)}, found {header}", path=path,
                            line=1)
        pos = {c: names.index(c.lower()) for c in columns}
        pos.update({o: names.index(o.lower()) for o in optional if o.lower() in names})
        for row in reader:
            if len(row) != len(header):
                yield reader.line_num, None, len(row)
            else:
                yield reader.line_num, {k: row[i] for k, i in pos.items()}, len(row)
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", path=path, line=reader.line_num) from e


# --- Hugging Face downloads -------------------------------------------------------------

def _load_hf(dataset: str):
    """``datasets.load_dataset(repo[, config])`` with errors turned into DataError."""
    repo, config = HF_REPOS[dataset]
    datasets = optional_import("datasets", extra="download", error=DataError,
                               purpose=f"{dataset}: downloading (Hugging Face)")
    args = (repo,) if config is None else (repo, config)
    try:
        return datasets.load_dataset(*args)
    except Exception as e:  # network, auth, cache: report the source and the cause
        raise DataError(f"{dataset}: download of hf:{repo} failed: "
                        f"{type(e).__name__}: {e}") from e


def _split(ds, dataset: str, name: str):
    try:
        return ds[name]
    except (KeyError, ValueError) as e:
        raise DataError(f"{dataset}: hf:{HF_REPOS[dataset][0]} has no split {name!r}") from e


def _label_names(split, dataset: str) -> list[str]:
    """The ClassLabel names of the ``label`` column (the ids alone do not say the order)."""
    feature = getattr(split, "features", {}).get("label")
    names = getattr(feature, "names", None)
    if not names:
        raise DataError(f"{dataset}: hf:{HF_REPOS[dataset][0]} has no ClassLabel names for "
                        "its 'label' column")
    return list(names)


def _text_label_split(ds, dataset: str, name: str) -> tuple[list[str], list[str]]:
    split = _split(ds, dataset, name)
    names = _label_names(split, dataset)
    texts = [str(t) for t in split["text"]]
    labels = [names[int(i)] for i in split["label"]]
    return texts, labels


def hf_emotions() -> dict[str, tuple[list[str], list[str]]]:
    """dair-ai/emotion ("split" config): ``{split: (texts, label names)}`` for
    train/validation/test. Names, not ids, so the caller maps them with its own table."""
    ds = _load_hf("emotions")
    return {s: _text_label_split(ds, "emotions", s) for s in ("train", "validation", "test")}


def hf_imdb() -> dict[str, tuple[list[str], list[str]]]:
    """stanfordnlp/imdb: ``{"train"|"test": (texts, label names "neg"/"pos")}``; the
    ``unsupervised`` split (no labels) is left out."""
    ds = _load_hf("imdb")
    return {s: _text_label_split(ds, "imdb", s) for s in ("train", "test")}


def hf_wikitext2() -> dict[str, str]:
    """Salesforce/wikitext wikitext-2-v1 as one string per split, the files' exact text.

    The Hub's rows are the lines of ``wiki.*.tokens`` with the newline kept, except that
    blank lines (``" \\n"`` in the file) were stored as ``""`` by the loading script; put
    them back so the text (and its word counts) equals the original files.
    """
    ds = _load_hf("wikitext2")
    out = {}
    for s in ("train", "validation", "test"):
        rows = _split(ds, "wikitext2", s)["text"]
        out[s] = "".join(row if row else " \n" for row in rows)
    return out


def hf_images(variant: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ylecun/mnist or zalando-datasets/fashion_mnist: ``{"train"|"test": (uint8 images
    (N, 28, 28), uint8 labels (N,))}``, the same arrays as the IDX files hold. The ``image``
    column holds grayscale PIL images; their ids are the standard class ids."""
    if variant not in ("mnist", "fashion"):
        raise ValueError(f"variant must be 'mnist' or 'fashion', got {variant!r}")
    ds = _load_hf(variant)
    out = {}
    for s in ("train", "test"):
        split = _split(ds, variant, s)
        images = np.stack([np.asarray(im, dtype=np.uint8) for im in split["image"]])
        labels = np.asarray(list(split["label"]), dtype=np.uint8)
        out[s] = (images, labels)
    return out
