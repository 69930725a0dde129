"""Real-file dataset loaders: the shared copies against their README, small written files
for every layout and every bad-data error, the split helpers, and the Hugging Face download
path with a fake ``datasets`` module."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.data import images, sources
from attnlab.data.images import load_digits, load_mnist, read_idx
from attnlab.data.sources import DataError, data_root, find_files, open_text, read_text
from attnlab.data.splits import (
    drop_leaks,
    random_split,
    split_manifest,
    split_sizes,
    stratified_split,
)
from attnlab.data.text import (
    EMOTION_CLASSES,
    IMDB_CLASSES,
    TextDataset,
    TextSplit,
    byte_classification,
    load_emotions,
    load_imdb,
    load_wikitext2,
    wikitext_words,
)

SHARED = Path(os.environ.get("ATTNLAB_TEST_DATA")
              or Path(__file__).parents[1].parent / "shared" / "datasets")
KAGGLE_NAMES = ("sadness", "happy", "love", "anger", "fear", "surprise")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No user data directory and no system Fashion-MNIST leak into a test."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setattr(images, "SYSTEM_FASHION_MNIST", tmp_path / "no-system-dir")


def shared(sub: str) -> Path:
    if not (SHARED / sub).is_dir():
        pytest.skip(f"real dataset copy {SHARED / sub} not present")
    return SHARED


def write(path: Path, content: str | bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def sizes(ds) -> dict[str, int]:
    return {k: len(v.texts) for k, v in ds.splits.items()}


def stripped(*splits) -> set[str]:
    return {t.strip() for s in splits for t in s.texts}


# --- real files: emotions -------------------------------------------------------------

README_EMOTIONS = {  # ../shared/datasets/README.md, dair-ai split
    "train": dict(joy=5362, sadness=4666, anger=2159, fear=1937, love=1304, surprise=572),
    "validation": dict(joy=704, sadness=550, anger=275, fear=212, love=178, surprise=81),
    "test": dict(joy=695, sadness=581, anger=275, fear=224, love=159, surprise=66),
}
README_EXTRA = dict(sadness=468, anger=284, fear=279, joy=268, surprise=160)


def read_dair_independently(root: Path) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for split, name in (("train", "train.txt"), ("validation", "val.txt"), ("test", "test.txt")):
        lines = (root / "emotion-dair-ai" / name).read_text(encoding="utf-8").splitlines()
        out[split] = [tuple(line.rsplit(";", 1)) for line in lines]
    return out


@pytest.fixture(scope="module")
def real_emotions():
    root = shared("emotion-dair-ai")
    shared("emotions")
    return (root, read_dair_independently(root), load_emotions(root, download=False),
            load_emotions(root, source="kaggle", download=False))


def class_counts(split: TextSplit, classes) -> dict[str, int]:
    return {classes[k]: v for k, v in Counter(split.labels).items()}


def test_real_emotions_dair_counts_and_leaks(real_emotions):
    root, raw, auto, _ = real_emotions
    for split in ("train", "validation", "test"):
        assert len(raw[split]) == sum(README_EMOTIONS[split].values())
        assert Counter(lab for _, lab in raw[split]) == Counter(README_EMOTIONS[split])
    ds = load_emotions(root, source="dair-ai", download=False)
    assert ds.classes == EMOTION_CLASSES == ("sadness", "joy", "love", "anger", "fear",
                                             "surprise")
    for split in ("validation", "test"):  # held-out splits are untouched
        assert ds.splits[split].texts == [t for t, _ in raw[split]]
        assert class_counts(ds.splits[split], ds.classes) == README_EMOTIONS[split]
    held = {t.strip() for s in ("validation", "test") for t, _ in raw[s]}
    kept = [(t, lab) for t, lab in raw["train"] if t.strip() not in held]
    assert len(raw["train"]) - len(kept) == 16  # README: 5 train/val + 11 train/test overlaps
    assert list(zip(ds.splits["train"].texts, ds.splits["train"].labels, strict=True)) == [
        (t, EMOTION_CLASSES.index(lab)) for t, lab in kept]
    assert "dropped 16 train rows" in " ".join(ds.notes)
    assert "3 texts are in both validation and test" in " ".join(ds.notes)


def test_real_emotions_kaggle_only_equals_dair_plus_extra(real_emotions):
    _, raw, auto, kaggle = real_emotions
    for split in ("validation", "test"):
        assert kaggle.splits[split].texts == [t for t, _ in raw[split]]
        assert kaggle.splits[split].labels == [EMOTION_CLASSES.index(lab)
                                               for _, lab in raw[split]]
    assert len(kaggle.splits["train"].texts) == 16000 + 1459 - 16
    extra = kaggle.splits["train"]
    assert class_counts(TextSplit(extra.texts[-1459:], extra.labels[-1459:]),
                        EMOTION_CLASSES) == README_EXTRA
    # auto = dair-ai files + the CSV's extra rows: the same data as the CSV alone.
    for split in ("train", "validation", "test"):
        assert auto.splits[split] == kaggle.splits[split]
    assert "Emotion_final.csv" in auto.source and "val.txt" in auto.source
    for ds in (auto, kaggle):
        assert not stripped(ds.splits["train"]) & stripped(ds.splits["validation"],
                                                           ds.splits["test"])
        assert any("1459 extra rows" in n for n in ds.notes)
    dropped = load_emotions(SHARED, extra_rows="drop", download=False)
    assert sizes(dropped) == {"train": 15984, "validation": 2000, "test": 2000}
    assert "no extra rows: extra_rows='drop'" in dropped.notes


# --- real files: IMDB, WikiText-2 ------------------------------------------------------

@pytest.fixture(scope="module")
def real_imdb():
    root = shared("imdb")
    with gzip.open(root / "imdb" / "imdb_aclImdb_v1.csv.gz", "rt", encoding="utf-8",
                   newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, load_imdb(root, seed=0, validation_fraction=0.1, download=False)


def test_real_imdb_official_split_and_no_leaks(real_imdb):
    rows, ds = real_imdb
    clean = [r["review"].replace("<br />", " ") for r in rows]
    official = {s: [i for i, r in enumerate(rows) if r["split"] == s] for s in ("train", "test")}
    assert {s: len(v) for s, v in official.items()} == {"train": 25000, "test": 25000}
    assert ds.classes == IMDB_CLASSES == ("negative", "positive")
    test = ds.splits["test"]
    assert test.texts == [clean[i] for i in official["test"]]
    assert Counter(test.labels) == {0: 12500, 1: 12500}
    val, train = ds.splits["validation"], ds.splits["train"]
    assert Counter(val.labels) == {0: 1250, 1: 1250}  # stratified 10 % of a 50/50 train
    # train + validation + dropped leaks = the official 25k train, nothing else
    pool = Counter(clean[i] for i in official["train"])
    assert not Counter(val.texts) - pool and not Counter(train.texts) - pool
    candidates = pool - Counter(val.texts)
    held = stripped(val, test)
    n_leaks = sum(c for t, c in candidates.items() if t.strip() in held)
    assert len(train.texts) == 25000 - 2500 - n_leaks
    assert f"dropped {n_leaks} train rows" in " ".join(ds.notes)
    assert not stripped(train) & held
    assert not any("<br" in t for t in train.texts[:2000])


def test_real_wikitext2_counts_match_readme():
    root = shared("wikitext-2")
    ds = load_wikitext2(root, download=False)
    expected = {"train": (36718, 2088628, 54625, "9e9fa1ad55b1c2c95b08e37dd8e653f6"),
                "validation": (3760, 217646, 11718, "f0737ed31fc1329026e95cb8b98e19c2"),
                "test": (4358, 245569, 15218, "d790b833ef8cf03a90db7bf1271b7520")}
    vocab = set()
    for split, (lines, tokens, unk, sha) in expected.items():
        (text,) = ds.splits[split].texts
        assert ds.splits[split].labels is None
        assert hashlib.sha256(text.encode("utf-8")).hexdigest().startswith(sha)  # SHA256SUMS
        words = wikitext_words(text)
        assert (text.count("\n"), len(words), words.count("<unk>")) == (lines, tokens, unk)
        vocab.update(words)
    assert len(vocab) == 33278
    assert ds.classes == () and ds.name == "wikitext2"


# --- real files: images ----------------------------------------------------------------

def test_real_fashion_mnist():
    root = shared("fashion-mnist")
    ds = load_mnist(root, variant="fashion", validation_fraction=0.0, download=False)
    x, y = ds.splits["train"]
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert torch.bincount(y).tolist() == [6000] * 10
    xt, yt = ds.splits["test"]
    assert len(xt) == 10000 and torch.bincount(yt).tolist() == [1000] * 10
    assert len(ds.splits["validation"][0]) == 0
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    path = root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    assert hashlib.sha256(sources.read_bytes(path)).hexdigest() == (  # SHA256SUMS
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b")
    raw = read_idx(path)
    assert torch.equal((xt[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(raw.copy()))
    assert ds.classes[9] == "Ankle boot"


def test_real_mnist_test_only():
    root = shared("mnist")
    with pytest.raises(DataError, match=r"(?s)train-images-idx3-ubyte.*test_only='split'"):
        load_mnist(root, download=False)
    ds = load_mnist(root, test_only="split", seed=0, download=False)
    counts = np.array([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    got = {s: torch.bincount(y, minlength=10).numpy() for s, (_, y) in ds.splits.items()}
    assert {s: int(c.sum()) for s, c in got.items()} == {"train": 7000, "validation": 1000,
                                                         "test": 2000}
    for s, frac in (("train", 0.7), ("validation", 0.1), ("test", 0.2)):
        assert np.all(np.abs(got[s] - counts * frac) < 1)  # stratified
    assert np.array_equal(sum(got.values()), counts)
    assert any("test_only='split'" in n for n in ds.notes)
    # every test image used once: the multiset of images is the test file's
    raw = read_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz")
    ours = torch.cat([x for x, _ in ds.splits.values()])
    assert sorted(hashlib.md5((r * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()
                  for r in ours) == sorted(hashlib.md5(r.tobytes()).hexdigest() for r in raw)


def test_digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    ds = load_digits(seed=0)
    sizes_ = {s: len(y) for s, (_, y) in ds.splits.items()}
    assert sizes_ == split_sizes(1797, {"train": 0.7, "validation": 0.1, "test": 0.2})
    x, _ = ds.splits["train"]
    assert x.shape[1:] == (1, 8, 8) and float(x.max()) == 1.0 and float(x.min()) == 0.0
    total = sum(torch.bincount(y, minlength=10) for _, y in ds.splits.values())
    assert total.tolist() == np.bincount(sklearn_datasets.load_digits().target).tolist()
    again = load_digits(seed=0)
    assert all(torch.equal(ds.splits[s][0], again.splits[s][0]) for s in ds.splits)


# --- small files: emotions ------------------------------------------------------------

def kaggle_rows(n: int = 20003) -> list[tuple[str, str]]:
    rows = []
    for i in range(n):
        text = f"text {i}"
        if i % 7 == 0:
            text = f"text {i}, with a comma"
        if i % 11 == 0:
            text = f'she said "{i}"'
        rows.append((text, KAGGLE_NAMES[i % 6]))
    if n > 18001:
        rows[3] = ("a;b semicolon", "love")
        rows[5] = (rows[16000][0], "joy")         # a train text that is also in test
        rows[6] = (" " + rows[18001][0] + " ", "fear")  # in validation, up to spaces
    return rows


def write_kaggle(path: Path, rows, gz=False) -> Path:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["Text", "Emotion"])
    w.writerows(rows)
    return write(path, buf.getvalue(), gz=gz)


def write_dair(folder: Path, rows) -> None:
    def lines(part):
        return "".join(f"{t};{'joy' if lab == 'happy' else lab}\n" for t, lab in part)
    write(folder / "train.txt", lines(rows[:16000]))
    write(folder / "test.txt", lines(rows[16000:18000]))
    write(folder / "val.txt", lines(rows[18000:20000]))


def test_emotions_kaggle_csv_split_by_position(tmp_path):
    rows = kaggle_rows()
    write_kaggle(tmp_path / "emotions" / "Emotion_final.csv", rows, gz=True)
    ds = load_emotions(tmp_path, download=False)
    ids = {name: EMOTION_CLASSES.index("joy" if name == "happy" else name)
           for name in KAGGLE_NAMES}
    assert ds.splits["test"].texts == [t for t, _ in rows[16000:18000]]
    assert ds.splits["validation"].texts == [t for t, _ in rows[18000:20000]]
    assert ds.splits["validation"].labels == [ids[lab] for _, lab in rows[18000:20000]]
    train = [r for i, r in enumerate(rows[:16000]) if i not in (5, 6)] + rows[20000:]
    assert ds.splits["train"].texts == [t for t, _ in train]
    assert ds.splits["train"].labels == [ids[lab] for _, lab in train]
    assert ds.splits["train"].texts[3] == "a;b semicolon"
    assert any("dropped 2 train rows" in n for n in ds.notes)
    drop = load_emotions(tmp_path, extra_rows="drop", download=False)
    assert len(drop.splits["train"].texts) == 16000 - 2
    assert any("left out 3 extra rows" in n for n in drop.notes)


def test_emotions_dair_files_plus_csv_extra_rows(tmp_path):
    rows = kaggle_rows()
    write_kaggle(tmp_path / "emotions" / "Emotion_final.csv", rows)
    write_dair(tmp_path / "emotion-dair-ai", rows)
    both = load_emotions(tmp_path, download=False)
    write_kaggle(tmp_path / "only" / "emotions" / "Emotion_final.csv", rows)
    csv_only = load_emotions(tmp_path / "only", download=False)
    assert both.splits == csv_only.splits
    assert len(both.splits["train"].texts) == 16000 - 2 + 3
    dair = load_emotions(tmp_path, source="dair-ai", download=False)
    assert len(dair.splits["train"].texts) == 16000 - 2
    # a CSV whose first 20000 rows are not the dair-ai files cannot say which rows are extra
    rows[10] = ("something else", "joy")
    write_kaggle(tmp_path / "emotions" / "Emotion_final.csv", rows)
    with pytest.raises(DataError, match="differ at data row 10"):
        load_emotions(tmp_path, download=False)


def test_emotions_dair_header_line_and_last_semicolon(tmp_path):
    folder = tmp_path / "emotion"
    write(folder / "train.txt", "text;label_name\ni feel; odd;surprise\nhappy me;joy\n")
    write(folder / "val.txt", "v one;love\n")
    write(folder / "test.txt", "t one;fear\r\n")
    ds = load_emotions(tmp_path, source="dair-ai", download=False)
    assert ds.splits["train"].texts == ["i feel; odd", "happy me"]
    assert ds.splits["train"].labels == [5, 1]
    assert ds.splits["test"].texts == ["t one"] and ds.splits["test"].labels == [4]


@pytest.mark.parametrize("train, match", [
    ("a;joy\nb;sadness\nc;joyful\n", r"train\.txt:3: unknown label 'joyful'"),
    ("a;joy\n  ;joy\n", r"train\.txt:2: empty text"),
    ("a;joy\n\nb;joy\n", r"train\.txt:2: empty line"),
    ("a joy\n", r"train\.txt:1: expected 'text;label'"),
])
def test_emotions_bad_rows(tmp_path, train, match):
    folder = tmp_path / "emotion-dair-ai"
    write(folder / "train.txt", train)
    write(folder / "val.txt", "v;love\n")
    write(folder / "test.txt", "t;love\n")
    with pytest.raises(DataError, match=match):
        load_emotions(tmp_path, source="dair-ai", download=False)


def test_emotions_on_bad_skip_counts(tmp_path):
    folder = tmp_path / "emotion-dair-ai"
    write(folder / "train.txt", "a;joy\n  ;joy\nb;joyful\nc;anger\nd;nope\n")
    write(folder / "val.txt", "v;love\n")
    write(folder / "test.txt", "t;love\n")
    ds = load_emotions(tmp_path, source="dair-ai", on_bad="skip", download=False)
    assert ds.splits["train"].texts == ["a", "c"]
    assert "skipped 3 bad rows (on_bad='skip'): empty text 1, unknown label 2" in ds.notes


@pytest.mark.parametrize("gz", [False, True])
def test_non_utf8_names_file_and_line(tmp_path, gz):
    folder = tmp_path / "emotion-dair-ai"
    write(folder / "train.txt", "a;joy\n")
    write(folder / "val.txt", b"v;love\nbad \xff byte;love\n", gz=gz)
    write(folder / "test.txt", "t;love\n")
    name = "val.txt.gz" if gz else "val.txt"
    with pytest.raises(DataError, match=rf"{name}:2: not valid UTF-8"):
        load_emotions(tmp_path, source="dair-ai", download=False)
    with pytest.raises(DataError, match=rf"{name}:2: not valid UTF-8"):
        read_text(folder / name)


def test_emotions_csv_wrong_header_and_short_file(tmp_path):
    write(tmp_path / "emotions" / "Emotion_final.csv", "Sentence,Label\r\nx,joy\r\n")
    with pytest.raises(DataError) as e:
        load_emotions(tmp_path, source="kaggle", download=False)
    assert "Emotion_final.csv:1: expected columns ['Text', 'Emotion'], found ['Sentence', " \
           "'Label']" in str(e.value)
    write_kaggle(tmp_path / "emotions" / "Emotion_final.csv", kaggle_rows(100))
    with pytest.raises(DataError, match="has 100 data rows"):
        load_emotions(tmp_path, source="kaggle", download=False)


def test_missing_files_lists_every_path_tried(tmp_path):
    with pytest.raises(DataError) as e:
        load_emotions(tmp_path, download=False)
    msg = str(e.value)
    for sub in ("emotion-dair-ai", "emotions", "emotion"):
        assert f"{tmp_path / sub}{os.sep}: train.txt, val.txt, test.txt, Emotion_final.csv" in msg
    assert f"{tmp_path}{os.sep}: train.txt" in msg and "download=False" in msg
    with pytest.raises(DataError, match="no folder searched: no data directory given"):
        load_emotions(download=False)


def test_data_root(tmp_path, monkeypatch):
    assert data_root() is None
    assert data_root(tmp_path) == tmp_path
    with pytest.raises(DataError, match=r"nowhere.*the data_dir argument.*does not exist"):
        data_root(tmp_path / "nowhere")
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"gone.*environment variable ATTNLAB_DATA"):
        data_root()
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path))
    assert data_root() == tmp_path
    write(tmp_path / "wikitext2" / "train.txt", " a \n")
    write(tmp_path / "wikitext2" / "valid.txt", " b \n")
    write(tmp_path / "wikitext2" / "test.txt.gz", gzip.compress(b" c \n"))
    found = find_files("wikitext2", [{"train": "train.txt", "test": "test.txt"}])
    assert found == {"train": tmp_path / "wikitext2" / "train.txt",
                     "test": tmp_path / "wikitext2" / "test.txt.gz"}


def test_open_text_keeps_crlf_for_csv(tmp_path):
    p = write(tmp_path / "x.csv", 'a,b\r\n"multi\r\nline",2\r\n', gz=True)
    assert list(csv.reader(open_text(p))) == [["a", "b"], ["multi\r\nline", "2"]]


# --- small files: IMDB ----------------------------------------------------------------

def write_acl(root: Path, n: int = 10) -> dict:
    reviews = {}
    for split in ("train", "test"):
        for label, rating in (("pos", 8), ("neg", 2)):
            for i in (0, 2, 10, *range(20, 20 + n - 3)):
                text = f"{split} {label} {i}<br /><br />end"
                write(root / split / label / f"{i}_{rating}.txt", text)
                reviews.setdefault((split, label), []).append(text)
    write(root / "train" / "unsup" / "0_0.txt", "unlabelled")
    write(root / "train" / "pos" / "urls_pos.txt.bak", "not a review")
    return reviews


def test_imdb_acl_folder(tmp_path):
    reviews = write_acl(tmp_path / "aclImdb")
    leak = tmp_path / "aclImdb" / "train" / "neg" / "99_1.txt"
    write(leak, reviews["test", "pos"][0])
    ds = load_imdb(tmp_path, validation_fraction=0.0, download=False)
    clean = {k: [t.replace("<br />", " ") for t in v] for k, v in reviews.items()}
    assert ds.splits["test"].texts == clean["test", "pos"] + clean["test", "neg"]
    assert ds.splits["train"].texts == clean["train", "pos"] + clean["train", "neg"]
    assert ds.splits["train"].labels == [1] * 10 + [0] * 10
    assert ds.splits["train"].texts[2] == "train pos 10  end"  # numeric id order: 0, 2, 10
    assert any("dropped 1 train rows" in n for n in ds.notes)
    raw = load_imdb(tmp_path, validation_fraction=0.2, clean_html=False, download=False)
    assert "<br /><br />" in raw.splits["test"].texts[0]
    assert Counter(raw.splits["validation"].labels) == {0: 2, 1: 2}


def test_imdb_kaggle_csv_without_split_column(tmp_path):
    rows = [(f"review {i}", "positive" if i % 2 else "negative") for i in range(40)]
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows([("review", "sentiment"), *rows])
    write(tmp_path / "IMDB" / "IMDB Dataset.csv", buf.getvalue(), gz=True)
    a = load_imdb(tmp_path, seed=1, validation_fraction=0.25, download=False)
    assert sizes(a) == {"train": 15, "validation": 5, "test": 20}
    assert Counter(a.splits["test"].labels) == {0: 10, 1: 10}
    assert sorted(Counter(a.splits["validation"].labels).values()) == [2, 3]
    every = sorted(t for v in a.splits.values() for t in v.texts)
    assert every == sorted(t for t, _ in rows)
    assert any("no split column" in n and "seed=1" in n for n in a.notes)
    assert load_imdb(tmp_path, seed=1, validation_fraction=0.25, download=False) == a
    b = load_imdb(tmp_path, seed=2, validation_fraction=0.25, download=False)
    assert b.splits["test"].texts != a.splits["test"].texts


def test_imdb_csv_split_column_and_errors(tmp_path):
    path = tmp_path / "imdb" / "imdb_aclImdb_v1.csv"
    write(path, "review,sentiment,split,id,rating\nok one,positive,train,0,9\n"
                "ok two,negative,train,1,2\nok three,negative,test,0,1\n")
    ds = load_imdb(tmp_path, validation_fraction=0.0, download=False)
    assert ds.splits["train"].labels == [1, 0] and ds.splits["test"].texts == ["ok three"]
    write(path, "text,label\nx,positive\n")
    with pytest.raises(DataError, match=r"csv:1: expected columns \['review', 'sentiment'\], "
                                        r"found \['text', 'label'\]"):
        load_imdb(tmp_path, download=False)
    write(path, "review,sentiment\na,positive\n\"b\nc\",neutral\n")
    with pytest.raises(DataError, match=r"imdb_aclImdb_v1\.csv:4: unknown label 'neutral'"):
        load_imdb(tmp_path, download=False)
    write(path, "review,sentiment\n  ,positive\n")
    with pytest.raises(DataError, match=r"csv:2: empty review"):
        load_imdb(tmp_path, download=False)


# --- small files: WikiText-2 and bytes ---------------------------------------------------

WIKI = " \n = Title = \n \n a b <unk> , c \n"


@pytest.mark.parametrize("folder, names, gz", [
    ("wikitext-2", ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"), False),
    (".", ("train.txt", "valid.txt", "test.txt"), True),
    ("wikitext-2-raw", ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"), True),
])
def test_wikitext_layouts(tmp_path, folder, names, gz):
    for i, name in enumerate(names):
        write(tmp_path / folder / name, WIKI * (i + 1), gz=gz)
    ds = load_wikitext2(tmp_path, download=False)
    assert [ds.splits[s].texts for s in ("train", "validation", "test")] == [
        [WIKI], [WIKI * 2], [WIKI * 3]]
    assert ("raw" in ds.notes[0]) == names[0].endswith(".raw")


def test_wikitext_words():
    assert wikitext_words(WIKI) == ["<eos>", "=", "Title", "=", "<eos>", "<eos>", "a", "b",
                                    "<unk>", ",", "c", "<eos>"]
    assert wikitext_words("x y\nz") == ["x", "y", "<eos>", "z", "<eos>"]
    assert wikitext_words("") == []


def test_byte_classification():
    ds = TextDataset("t", ("a", "b"), {
        "train": TextSplit(["héllo", "ok"], [0, 1]),
        "validation": TextSplit(["日本語"], [1]), "test": TextSplit([], [])}, "mem", ("n",))
    cut = byte_classification(ds, 2)
    assert cut.splits["train"].texts == ["h", "ok"]  # "é" is 2 bytes: dropped at the cut
    assert cut.splits["validation"].texts == [""]    # 3-byte characters
    assert cut.splits["train"].labels == [0, 1] and cut.classes == ds.classes
    assert cut.notes[-1] == "UTF-8 bytes: 2 of 3 texts truncated to 2 bytes"
    three = byte_classification(ds, 3)
    assert three.splits["train"].texts == ["hé"] + ["ok"]
    assert all(len(t.encode()) <= 3 for s in three.splits.values() for t in s.texts)
    with pytest.raises(ValueError, match="max_bytes"):
        byte_classification(ds, 0)
    lm = TextDataset("lm", (), {"train": TextSplit(["x"], None)}, "mem")
    with pytest.raises(ValueError, match="labelled"):
        byte_classification(lm, 4)


# --- small files: IDX / MNIST ----------------------------------------------------------

def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 2051 if arr.ndim == 3 else 2049
    return b"".join(int(v).to_bytes(4, "big") for v in (magic, *arr.shape)) + \
        arr.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int | None, n_test: int, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        if n is None:
            continue
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = np.arange(n, dtype=np.uint8) % 10
        write(folder / f"{split}-images-idx3-ubyte", idx_bytes(x), gz=gz)
        write(folder / f"{split}-labels-idx1-ubyte", idx_bytes(y), gz=gz)
        out[split] = (x, y)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip_and_errors(tmp_path, gz):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = write(tmp_path / "img", idx_bytes(x), gz=gz)
    assert np.array_equal(read_idx(p), x)
    p = write(tmp_path / "lab", idx_bytes(np.array([7, 2, 1], dtype=np.uint8)), gz=gz)
    assert read_idx(p).tolist() == [7, 2, 1]
    p = write(tmp_path / "short", idx_bytes(x)[:-5], gz=gz)
    with pytest.raises(DataError, match=r"short.*: truncated IDX file: shape \(2, 3, 4\) "
                                        r"needs 40 bytes, found 35"):
        read_idx(p)
    p = write(tmp_path / "magic", b"\x00\x00\x08\x02" + idx_bytes(x)[4:], gz=gz)
    with pytest.raises(DataError, match=r"expected magic 2051 \(images\) or 2049 \(labels\), "
                                        r"found 2050"):
        read_idx(p)


def test_read_idx_truncated_gzip(tmp_path):
    data = gzip.compress(idx_bytes(np.zeros((5, 28, 28), np.uint8)))
    p = write(tmp_path / "cut.gz", data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.gz: corrupt or truncated gzip"):
        read_idx(p)


def test_mnist_small_layouts(tmp_path, monkeypatch):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", 100, 30)
    ds = load_mnist(tmp_path, validation_fraction=0.2, seed=3, download=False)
    (xt, yt), (xv, yv), (xtr, ytr) = (ds.splits[s] for s in ("test", "validation", "train"))
    assert torch.equal((xt[:, 0] * 255).round().to(torch.uint8),
                       torch.from_numpy(arrays["t10k"][0]))
    assert len(yv) == 20 and torch.bincount(yv).tolist() == [2] * 10 and len(ytr) == 80
    assert list(ds.splits) == ["train", "validation", "test"]
    again = load_mnist(tmp_path, validation_fraction=0.2, seed=3, download=False)
    assert torch.equal(again.splits["validation"][0], xv)
    # Fashion-MNIST in the Debian location, with no data directory at all
    system = tmp_path / "usr-share"
    write_mnist(system, 20, 10, gz=False, seed=1)
    monkeypatch.setattr(images, "SYSTEM_FASHION_MNIST", system)
    fashion = load_mnist(variant="fashion", validation_fraction=0.0, download=False)
    assert str(system) in fashion.source and fashion.classes[0] == "T-shirt/top"
    assert len(fashion.splits["train"][1]) == 20


def test_mnist_test_only_small(tmp_path):
    write_mnist(tmp_path / "mnist", None, 50)
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path, download=False)
    assert "train-images-idx3-ubyte" in str(e.value) and "test_only='split'" in str(e.value)
    ds = load_mnist(tmp_path, test_only="split", download=False)
    assert {s: len(y) for s, (_, y) in ds.splits.items()} == {"train": 35, "validation": 5,
                                                             "test": 10}
    write(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz",
          gzip.compress(idx_bytes(np.zeros(49, np.uint8))))
    with pytest.raises(DataError, match="50 images but 49 labels"):
        load_mnist(tmp_path, test_only="split", download=False)


# --- splits --------------------------------------------------------------------------

labels_st = st.lists(st.integers(0, 4), max_size=120)
fractions_st = st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4).map(
    lambda ws: {f"s{i}": w / sum(ws) for i, w in enumerate(ws)})


@given(labels_st, fractions_st, st.integers(0, 2**32 - 1))
def test_stratified_split_properties(labels, fractions, seed):
    labels = np.asarray(labels, dtype=np.int64)
    out = stratified_split(labels, fractions, seed)
    assert list(out) == list(fractions)
    every = np.concatenate(list(out.values()))
    assert np.array_equal(np.sort(every), np.arange(len(labels)))  # disjoint and complete
    assert {k: len(v) for k, v in out.items()} == split_sizes(len(labels), fractions)
    for name, idx in out.items():
        assert abs(len(idx) - len(labels) * fractions[name]) < 1
        assert np.all(np.diff(idx) > 0)
        for c in np.unique(labels):  # stratified: every class within one of its share
            n_c = int((labels == c).sum())
            assert abs(int((labels[idx] == c).sum()) - n_c * fractions[name]) < 1
    again = stratified_split(labels, fractions, seed)
    assert all(np.array_equal(out[k], again[k]) for k in out)


@given(st.integers(0, 500), fractions_st, st.integers(0, 2**32 - 1))
def test_random_split_properties(n, fractions, seed):
    out = random_split(n, fractions, seed)
    assert np.array_equal(np.sort(np.concatenate(list(out.values()))), np.arange(n))
    for name, idx in out.items():
        assert abs(len(idx) - n * fractions[name]) < 1
    assert sum(split_sizes(n, fractions).values()) == n


@pytest.mark.parametrize("counts, fractions", [
    ((8, 8, 3), (0.52, 0.34, 0.14)),
    ((2, 10, 10), (0.06, 0.74, 0.2)),
    ((11, 11, 6, 2), (0.05, 0.23, 0.72)),
])
def test_stratified_split_keeps_every_class_within_one(counts, fractions):
    """Cases where rounding each class alone and then moving single items between splits
    leaves a class more than one item off its share; exact totals need a chain of moves."""
    labels = np.repeat(np.arange(len(counts)), counts)
    fr = {f"s{i}": f for i, f in enumerate(fractions)}
    out = stratified_split(labels, fr, seed=0)
    assert {k: len(v) for k, v in out.items()} == split_sizes(len(labels), fr)
    for name, idx in out.items():
        per_class = np.bincount(labels[idx], minlength=len(counts))
        assert np.all(np.abs(per_class - np.asarray(counts) * fr[name]) < 1), (name, per_class)


def test_splits_seed_changes_the_draw():
    labels = np.arange(300) % 3
    fr = {"train": 0.8, "test": 0.2}
    a, b = stratified_split(labels, fr, 0), stratified_split(labels, fr, 1)
    assert not np.array_equal(a["test"], b["test"])
    assert not np.array_equal(random_split(300, fr, 0)["test"], random_split(300, fr, 1)["test"])
    assert np.array_equal(random_split(300, fr, 5)["test"], random_split(300, fr, 5)["test"])


@pytest.mark.parametrize("fractions, err, match", [
    ({}, TypeError, "non-empty dict"),
    ([0.5, 0.5], TypeError, "non-empty dict"),
    ({"a": 0.5}, ValueError, "sum to 1"),
    ({"a": 1.2, "b": -0.2}, ValueError, r"fractions\['b'\] must be a finite number > 0"),
    ({"a": float("nan"), "b": 0.5}, ValueError, "finite"),
    ({"a": 0.0, "b": 1.0}, ValueError, "> 0"),
    ({"": 1.0}, TypeError, "non-empty strings"),
    ({"a": "0.5", "b": 0.5}, TypeError, "must be a number"),
])
def test_fractions_validated(fractions, err, match):
    with pytest.raises(err, match=match):
        stratified_split([0, 1], fractions, 0)
    with pytest.raises(err, match=match):
        random_split(2, fractions, 0)


def test_split_manifest():
    m = split_manifest({"train": ["ab", "c"], "test": []})
    assert json.loads(json.dumps(m)) == m
    assert m["train"]["count"] == 2 and m["test"]["count"] == 0
    other = split_manifest({"train": ["a", "bc"]})["train"]
    assert other["sha256"] != m["train"]["sha256"]  # length-prefixed: no concatenation clash
    swapped = split_manifest({"train": ["c", "ab"]})["train"]
    assert swapped["sha256"] != m["train"]["sha256"]
    assert swapped["sha256_sorted"] == m["train"]["sha256_sorted"]
    with pytest.raises(TypeError, match="strings"):
        split_manifest({"x": [1]})


def test_drop_leaks():
    texts, labels, n = drop_leaks(["a", " b", "c", "d "], [0, 1, 2, 3], ["b"], ["d", "zz"])
    assert (texts, labels, n) == (["a", "c"], [0, 2], 2)
    assert drop_leaks(["a", "b"], None, ["a "]) == (["b"], None, 1)
    with pytest.raises(ValueError, match="one label per text"):
        drop_leaks(["a"], [0, 1])


# --- Hugging Face download, with a fake `datasets` module --------------------------------

class _ClassLabel:
    def __init__(self, names):
        self.names = names


class _Split:
    def __init__(self, columns, names=None):
        self.columns = columns
        self.features = {"label": _ClassLabel(names)} if names else {}

    def __getitem__(self, column):
        return self.columns[column]


@pytest.fixture
def fake_hf(monkeypatch):
    calls, table = [], {}

    def load_dataset(*args):
        calls.append(args)
        if args not in table:
            raise ConnectionError(f"no network for {args}")
        return table[args]

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls, table


def test_hf_emotions_and_imdb_map_names(tmp_path, fake_hf):
    calls, table = fake_hf
    names = ["joy", "sadness", "love", "anger", "fear", "surprise"]  # a permuted ClassLabel
    table["dair-ai/emotion", "split"] = {
        "train": _Split({"text": ["a", "b", "v"], "label": [0, 1, 2]}, names),
        "validation": _Split({"text": ["v"], "label": [5]}, names),
        "test": _Split({"text": ["t"], "label": [4]}, names)}
    ds = load_emotions(tmp_path)
    assert calls[-1] == ("dair-ai/emotion", "split") and ds.source == "hf:dair-ai/emotion"
    assert ds.splits["train"].texts == ["a", "b"] and ds.splits["train"].labels == [1, 0]
    assert ds.splits["validation"].labels == [5] and ds.splits["test"].labels == [4]
    table["stanfordnlp/imdb",] = {
        "train": _Split({"text": [f"r{i}<br />x" for i in range(10)],
                         "label": [i % 2 for i in range(10)]}, ["neg", "pos"]),
        "test": _Split({"text": ["t0", "t1"], "label": [1, 0]}, ["neg", "pos"]),
        "unsupervised": _Split({"text": ["u"], "label": [-1]}, ["neg", "pos"])}
    imdb = load_imdb(tmp_path, validation_fraction=0.2)
    assert calls[-1] == ("stanfordnlp/imdb",)
    assert imdb.splits["test"].labels == [1, 0] and imdb.classes[1] == "positive"
    assert Counter(imdb.splits["validation"].labels) == {0: 1, 1: 1}
    assert "r0 x" in imdb.splits["train"].texts + imdb.splits["validation"].texts


def test_hf_wikitext_restores_blank_lines(tmp_path, fake_hf):
    calls, table = fake_hf
    rows = ["", " = Title = \n", "", " a b <unk> , c \n"]  # how the Hub stores WIKI
    table["Salesforce/wikitext", "wikitext-2-v1"] = {
        s: _Split({"text": rows}) for s in ("train", "validation", "test")}
    ds = load_wikitext2(tmp_path)
    assert calls == [("Salesforce/wikitext", "wikitext-2-v1")]
    assert ds.splits["validation"].texts == [WIKI]


@pytest.mark.parametrize("variant, repo", [("mnist", "ylecun/mnist"),
                                           ("fashion", "zalando-datasets/fashion_mnist")])
def test_hf_images(tmp_path, fake_hf, variant, repo):
    calls, table = fake_hf
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(30)]
    table[repo,] = {"train": _Split({"image": pics[:20], "label": [i % 10 for i in range(20)]}),
                    "test": _Split({"image": pics[20:], "label": list(range(10))})}
    ds = load_mnist(tmp_path, variant=variant, validation_fraction=0.5)
    assert calls == [(repo,)] and ds.source == f"hf:{repo}"
    x, y = ds.splits["test"]
    assert y.tolist() == list(range(10))
    assert torch.allclose(x[3, 0], torch.from_numpy(pics[23]).float() / 255)
    assert len(ds.splits["validation"][1]) == 10


def test_hf_failures_list_paths(tmp_path, fake_hf, monkeypatch):
    with pytest.raises(DataError, match=r"(?s)wikitext-2.*download of hf:Salesforce/wikitext "
                                        r"failed: ConnectionError"):
        load_wikitext2(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(DataError, match=r"(?s)imdb/: .*IMDB Dataset\.csv.*pip install datasets"):
        load_imdb(tmp_path)
