"""Datasets for attnlab: real-file loaders, tokenizers, batching and generated tasks.

* Real files (``--data-dir`` / ``ATTNLAB_DATA``, else a Hugging Face download):
  :func:`load_emotions`, :func:`load_imdb`, :func:`load_wikitext2`, :func:`load_mnist`;
  bundled with scikit-learn: :func:`load_digits`. Bad files raise :class:`DataError`
  naming the file and line.
* Generated, no download (seeded): ListOps, associative recall, copy, selective copy
  (``attnlab.data.synthetic``) and copy/reverse/sort translation pairs
  (:func:`seq2seq_task`).
* Generated graphs (a stochastic block model; Zachary's karate club, through networkx:
  :mod:`attnlab.data.graphs`) and question/passage pairs (fact lookup,
  :mod:`attnlab.data.pairs`).
* Tokenizers (:func:`train_tokenizer`: word, BPE, WordPiece, byte, char) and batching
  (:func:`pad_batch`, :class:`BucketBatchSampler`, :class:`LMStream`); inpainting masks
  (:func:`make_masks`).
"""

from attnlab.data.batching import BucketBatchSampler, LMStream, pad_batch
from attnlab.data.graphs import GraphDataset, karate_club, stochastic_block_model
from attnlab.data.images import ImageDataset, load_digits, load_mnist
from attnlab.data.inpaint import apply_mask, make_masks
from attnlab.data.pairs import PairData, fact_lookup, passage_only_accuracy
from attnlab.data.seq2seq import seq2seq_task
from attnlab.data.sources import DataError
from attnlab.data.synthetic import *  # noqa: F403  (the public names, listed once there)
from attnlab.data.synthetic import __all__ as _synthetic
from attnlab.data.text import TextDataset, load_emotions, load_imdb, load_wikitext2
from attnlab.data.tokenize import load_tokenizer, train_tokenizer

__all__ = [
    *_synthetic, "BucketBatchSampler", "DataError", "GraphDataset", "ImageDataset", "LMStream",
    "PairData", "TextDataset", "apply_mask", "fact_lookup", "karate_club", "load_digits",
    "load_emotions", "load_imdb", "load_mnist", "load_tokenizer", "load_wikitext2",
    "make_masks", "pad_batch", "passage_only_accuracy", "seq2seq_task",
    "stochastic_block_model", "train_tokenizer",
]
