"""Image datasets from their real files: MNIST, Fashion-MNIST (IDX format) and sklearn digits.

Images come back as float32 tensors ``(N, 1, H, W)`` in ``[0, 1]`` (pixel / 255, or / 16
for the 8x8 digits) and labels as int64 ``(N,)``, in an :class:`ImageDataset` whose
``notes`` say how the splits were made.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnlab.data import sources
from attnlab.data.sources import DataError, data_root, find_files, read_bytes
from attnlab.data.splits import stratified_split
from attnlab.util.optional import optional_import

__all__ = [
    "FASHION_CLASSES",
    "MNIST_CLASSES",
    "SYSTEM_FASHION_MNIST",
    "ImageDataset",
    "load_digits",
    "load_mnist",
    "read_idx",
]

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
# Where Debian's dataset-fashion-mnist package installs the IDX files (searched after the
# data directory). A module constant so tests can point it elsewhere.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# IDX magic numbers (LeCun's format): 0x0803 = unsigned bytes, 3 dims; 0x0801 = 1 dim.
_IDX = {2051: 3, 2049: 1}

_FULL = [{"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
          "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"},
         {"train_images": "train-images.idx3-ubyte", "train_labels": "train-labels.idx1-ubyte",
          "test_images": "t10k-images.idx3-ubyte", "test_labels": "t10k-labels.idx1-ubyte"}]
_TEST_ONLY = [{k: v for k, v in layout.items() if k.startswith("test")} for layout in _FULL]


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (plain or gzip) as uint8: images ``(N, rows, cols)`` (magic 2051) or
    labels ``(N,)`` (magic 2049). The header is big-endian int32s: magic, then one size
    per dimension; the pixels follow in row-major order."""
    path = Path(path)
    data = read_bytes(path)
    if len(data) < 4:
        raise DataError(f"IDX file too short: expected at least a 4-byte header, found "
                        f"{len(data)} bytes", path=path)
    magic = int.from_bytes(data[:4], "big")
    if magic not in _IDX:
        raise DataError(f"not an IDX ubyte file: expected magic 2051 (images) or 2049 "
                        f"(labels), found {magic}", path=path)
    ndim = _IDX[magic]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"truncated IDX header: expected {header} bytes, found {len(data)}",
                        path=path)
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing data in"
        raise DataError(f"{what} IDX file: shape {shape} needs {expected} bytes, found "
                        f"{len(data)}", path=path)
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


@dataclass(frozen=True)
class ImageDataset:
    name: str                                            # "mnist", "fashion_mnist", "digits"
    classes: tuple[str, ...]                             # label names, index = label id
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # (N, 1, H, W) float32, (N,) int64
    source: str
    notes: tuple[str, ...] = field(default=())

    def manifest(self) -> dict:
        """Per split: count and SHA-256 of the images and labels, for run logs."""
        out = {}
        for name, (x, y) in self.splits.items():
            h = hashlib.sha256(x.contiguous().numpy().tobytes())
            h.update(y.contiguous().numpy().tobytes())
            out[name] = {"count": len(y), "sha256": h.hexdigest()}
        return out


def _tensors(images: np.ndarray, labels: np.ndarray, scale: float) -> tuple:
    # torch.tensor copies (the IDX arrays are read-only views of the file's bytes); the
    # conversion and scaling then run in place in torch, one float32 allocation.
    x = torch.tensor(images).to(torch.float32).div_(scale).unsqueeze(1)
    return x, torch.tensor(np.asarray(labels), dtype=torch.int64)


def _pair(images: np.ndarray, labels: np.ndarray, paths: tuple) -> tuple:
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"expected images (N, rows, cols) and labels (N,), found shapes "
                        f"{images.shape} and {labels.shape}", path=paths[0])
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels in {paths[1]}",
                        path=paths[0])
    if labels.size and labels.max() > 9:
        raise DataError(f"labels must be 0-9, found {int(labels.max())}", path=paths[1])
    return images, labels


def _subset(images, labels, idx) -> tuple:
    return images[idx], labels[idx]


def load_mnist(data_dir=None, *, variant: str = "mnist", test_only: str = "error",
               validation_fraction: float = 0.1, seed: int = 0,
               download: bool = True) -> ImageDataset:
    """MNIST (LeCun et al.) or Fashion-MNIST (Xiao et al. 2017) from the original IDX files.

    Files: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or the ``images.idx3`` spelling),
    plain or ``.gz``, under the data directory; for Fashion-MNIST also in
    :data:`SYSTEM_FASHION_MNIST`; else a Hugging Face download. Validation is a seeded
    stratified ``validation_fraction`` of train. When only the test files exist (the MNIST
    copy in ../shared): ``test_only="split"`` splits the 10k test images, stratified and
    seeded, into train/validation/test 0.7/0.1/0.2 (noted); ``"error"`` raises.
    """
    if variant not in ("mnist", "fashion"):
        raise ValueError(f"variant must be 'mnist' or 'fashion', got {variant!r}")
    if test_only not in ("error", "split"):
        raise ValueError(f"test_only must be 'error' or 'split', got {test_only!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    name = "mnist" if variant == "mnist" else "fashion_mnist"
    classes = MNIST_CLASSES if variant == "mnist" else FASHION_CLASSES
    root = data_root(data_dir)
    extra = (SYSTEM_FASHION_MNIST,) if variant == "fashion" else ()
    tried: list[tuple[Path, str]] = []
    notes: list[str] = []
    full = find_files(variant, _FULL, root, extra_dirs=extra, tried=tried)
    test_files = None if full else find_files(variant, _TEST_ONLY, root, extra_dirs=extra)
    if full is not None:
        arrays = {s: _pair(read_idx(full[f"{s}_images"]), read_idx(full[f"{s}_labels"]),
                           (full[f"{s}_images"], full[f"{s}_labels"])) for s in ("train", "test")}
        source = ", ".join(str(p) for p in full.values())
    elif test_files is not None and test_only == "split":
        paths = (test_files["test_images"], test_files["test_labels"])
        images, labels = _pair(read_idx(paths[0]), read_idx(paths[1]), paths)
        idx = stratified_split(labels, {"train": 0.7, "validation": 0.1, "test": 0.2}, seed)
        splits = {s: _tensors(*_subset(images, labels, ix), 255.0) for s, ix in idx.items()}
        notes.append(f"only the test files exist: their {len(labels)} images split "
                     f"(stratified, seed={seed}) into train/validation/test 0.7/0.1/0.2 "
                     "(test_only='split')")
        return ImageDataset(name, classes, splits, ", ".join(str(p) for p in paths),
                            tuple(notes))
    else:
        hint = ""
        if test_files is not None:
            hint = (f"\nOnly the test files were found ({test_files['test_images'].parent}): "
                    "the train files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                    "also as .gz) are missing. Pass test_only='split' to split the test set "
                    "into train/validation/test.")
        arrays = sources.hf_fetch(name, tried, download, sources.hf_images, variant, hint=hint)
        source = f"hf:{sources.HF_REPOS[variant][0]}"
        arrays = {s: _pair(*arrays[s], (source, source)) for s in ("train", "test")}
    (train_x, train_y), test = arrays["train"], arrays["test"]
    splits = {"test": _tensors(*test, 255.0)}
    if validation_fraction > 0:
        idx = stratified_split(train_y, {"train": 1 - validation_fraction,
                                         "validation": validation_fraction}, seed)
        for s in ("train", "validation"):
            splits[s] = _tensors(*_subset(train_x, train_y, idx[s]), 255.0)
        notes.append(f"validation: seeded (seed={seed}) stratified {validation_fraction:g} "
                     "of train")
    else:
        splits["train"] = _tensors(train_x, train_y, 255.0)
        splits["validation"] = _tensors(train_x[:0], train_y[:0], 255.0)
        notes.append("validation: none (validation_fraction=0)")
    splits = {s: splits[s] for s in ("train", "validation", "test")}
    return ImageDataset(name, classes, splits, source, tuple(notes))


def load_digits(*, seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, UCI optdigits test
    set): pixel counts 0..16 scaled to [0, 1], stratified seeded train/validation/test
    0.7/0.1/0.2. Nothing is downloaded; needs ``pip install attnlab[data]``."""
    sk_datasets = optional_import("sklearn.datasets", extra="data", dist="scikit-learn",
                                  purpose="load_digits")
    bunch = sk_datasets.load_digits()
    images, labels = np.asarray(bunch.images), np.asarray(bunch.target)
    idx = stratified_split(labels, {"train": 0.7, "validation": 0.1, "test": 0.2}, seed)
    splits = {s: _tensors(*_subset(images, labels, ix), 16.0) for s, ix in idx.items()}
    note = f"stratified (seed={seed}) train/validation/test 0.7/0.1/0.2 of 1797 images"
    return ImageDataset("digits", MNIST_CLASSES, splits, "sklearn.datasets.load_digits",
                        (note,))
