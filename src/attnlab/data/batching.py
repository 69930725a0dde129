"""Batches of token ids: padding and truncation, length bucketing, language-model streams.

* :func:`pad_batch` -- pad (and truncate) a list of id sequences to one LongTensor plus a
  padding mask (True = pad), optionally with a CLS token in front.
* :class:`BucketBatchSampler` -- batches of similar lengths, so little of each batch is
  padding, in an order that is a pure function of ``(seed, epoch)`` (resumable).
* :class:`LMStream` -- one long token stream cut into language-model batches the way
  pytorch/examples ``word_language_model`` does (``batchify`` + ``get_batch``).
* :class:`SequenceDataset` and :func:`collate` -- a Dataset of (ids, label) and the
  matching DataLoader ``collate_fn``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from attnlab.data.tokenize import PAD
from attnlab.util.checks import check_int, did_you_mean

__all__ = ["TRUNCATE_MODES", "BucketBatchSampler", "LMStream", "SequenceDataset", "collate",
           "pad_batch", "padding_fraction"]

TRUNCATE_MODES = ("head", "tail", "head+tail")





def _check_pad_args(pad_id, max_len, truncate, prepend) -> None:
    check_int("pad_id", pad_id, low=0)
    check_int("prepend", prepend, low=0, nullable=True)
    check_int("max_len", max_len, low=1 if prepend is None else 2, nullable=True)
    if truncate not in TRUNCATE_MODES:
        hint = did_you_mean(truncate, TRUNCATE_MODES, n=2, cutoff=0.4)
        raise ValueError(f"truncate: expected one of {TRUNCATE_MODES}, got {truncate!r}{hint}")


def _truncate(seq, budget: int, mode: str) -> list[int]:
    n = len(seq)
    if n <= budget:
        return list(seq)
    if mode == "head":
        return list(seq[:budget])
    if mode == "tail":
        return list(seq[n - budget:])
    head = budget // 4  # Sun et al. 2019: 128 head + 382 tail tokens of 510 was best on IMDB
    return list(seq[:head]) + list(seq[n - (budget - head):])


def pad_batch(seqs: Sequence[Sequence[int]], *, pad_id: int = PAD, max_len: int | None = None,
              truncate: str = "head", prepend: int | None = None, multiple: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, N) long, padding_mask (B, N) bool, True = pad)``, right-padded.

    Sequences longer than ``max_len`` (which counts a ``prepend`` token, e.g. CLS) are cut:
    ``"head"`` keeps the first tokens, ``"tail"`` the last, ``"head+tail"`` the first
    ``budget // 4`` and the last ``budget - budget // 4`` (Sun et al. 2019, "How to Fine-Tune
    BERT for Text Classification?"), where ``budget = max_len - (prepend is not None)``.
    ``N`` is the longest row after truncation, rounded up to a ``multiple`` (for mechanisms
    that cut the sequence into equal chunks: Reformer's buckets, Sinkhorn's blocks; like
    Hugging Face's ``pad_to_multiple_of``), which must then divide ``max_len``. The mask
    comes from the lengths, never from the values, so an id equal to ``pad_id`` inside a
    sequence is still a token.
    """
    _check_pad_args(pad_id, max_len, truncate, prepend)
    check_int("multiple", multiple, low=1)
    if max_len is not None and max_len % multiple:
        raise ValueError(f"multiple: expected a divisor of max_len={max_len} (a padded batch "
                         f"must still fit), got {multiple}")
    if len(seqs) == 0:
        raise ValueError("seqs: expected at least one sequence, got an empty batch")
    budget = None if max_len is None else max_len - (prepend is not None)
    rows = []
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"seqs[{i}] is empty; every sequence needs at least one token")
        if isinstance(s, (torch.Tensor, np.ndarray)):
            s = s.tolist()
        rows.append(_truncate(s, budget, truncate) if budget is not None else list(s))
    if prepend is not None:
        rows = [[prepend, *r] for r in rows]
    lengths = torch.tensor([len(r) for r in rows])
    n = -(-int(lengths.max()) // multiple) * multiple
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    padding_mask = torch.arange(n)[None, :] >= lengths[:, None]
    return ids, padding_mask


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded ``(B, longest)`` slots over all ``batches`` that are padding."""
    lengths = np.asarray(lengths)
    total = real = 0
    for b in batches:
        ls = lengths[np.asarray(b, dtype=np.int64)]
        total += len(ls) * int(ls.max())
        real += int(ls.sum())
    if total == 0:
        raise ValueError("batches: expected at least one non-empty batch")
    return 1.0 - real / total


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices of similar length, for ``DataLoader(batch_sampler=...)``.

    Per epoch: shuffle all indices with a generator seeded by ``(seed, epoch)``; cut them
    into pools of ``batch_size * bucket_size_multiplier``; sort each pool by length; cut
    batches of ``batch_size`` (and/or of at most ``max_tokens`` padded tokens, i.e.
    ``len(batch) * longest <= max_tokens``); shuffle the order of the batches. Sorting
    inside a pool, not globally, keeps the batches random across epochs while their
    padding stays low (the bucketing of torchtext's ``BucketIterator`` and fairseq).

    The order is a pure function of ``(seed, epoch)``: ``set_epoch(epoch, start=k)``
    resumes an interrupted epoch exactly after its first ``k`` batches. Every index appears
    exactly once per epoch, except the last short batch with ``drop_last`` (count batching
    only). With ``shuffle=False`` there is no shuffle, only the sort within pools.
    ``lengths`` should be the lengths after truncation (what the collate function will see).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int | None = None, *,
                 max_tokens: int | None = None, shuffle: bool = True, seed: int = 0,
                 bucket_size_multiplier: int = 50, drop_last: bool = False):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError(f"lengths: expected a non-empty 1-D sequence, got shape "
                             f"{self.lengths.shape}")
        if (self.lengths < 1).any():
            i = int(np.argmax(self.lengths < 1))
            raise ValueError(f"lengths[{i}]: expected >= 1, got {int(self.lengths[i])}")
        check_int("batch_size", batch_size, low=1, nullable=True)
        check_int("max_tokens", max_tokens, low=1, nullable=True)
        check_int("seed", seed, low=0)
        check_int("bucket_size_multiplier", bucket_size_multiplier, low=1)
        if batch_size is None and max_tokens is None:
            raise ValueError("batch_size / max_tokens: give at least one, got neither")
        if max_tokens is not None and self.lengths.max() > max_tokens:
            i = int(np.argmax(self.lengths))
            raise ValueError(f"lengths[{i}] = {int(self.lengths[i])} exceeds max_tokens = "
                             f"{max_tokens}; pass lengths clipped to the model's max_len")
        if drop_last and max_tokens is not None:
            raise ValueError("drop_last: only for count batching (max_tokens=None); with a "
                             "token budget batch sizes vary anyway")
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        per_batch = batch_size or max(1, max_tokens // max(1, int(self.lengths.mean())))
        self.pool_size = per_batch * bucket_size_multiplier
        self.epoch, self.start = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        out: list[list[int]] = []
        for p in range(0, n, self.pool_size):
            pool = order[p: p + self.pool_size]
            out += self._cut(pool[np.argsort(self.lengths[pool], kind="stable")])
        # Pools hold whole multiples of batch_size, so only the very last batch can be short.
        if self.drop_last and len(out[-1]) < self.batch_size:
            out.pop()
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        self._cache = (epoch, out)
        return out

    def _cut(self, idx: np.ndarray) -> list[list[int]]:
        out, cur, longest = [], [], 0
        for i, length in zip(idx.tolist(), self.lengths[idx].tolist(), strict=True):
            new_longest = max(longest, length)
            full = (self.batch_size is not None and len(cur) == self.batch_size) or (
                self.max_tokens is not None and new_longest * (len(cur) + 1) > self.max_tokens)
            if cur and full:
                out.append(cur)
                cur, new_longest = [], length
            cur.append(i)
            longest = new_longest
        if cur:
            out.append(cur)
        return out

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use ``epoch``'s order from its batch ``start`` on (``start`` = batches done)."""
        check_int("epoch", epoch, low=0)
        total = len(self.batches(epoch))
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= total:
            raise ValueError(f"start: expected an int in [0, {total}] (epoch {epoch} has "
                             f"{total} batches), got {start!r}")
        self.epoch, self.start = int(epoch), start

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self.batches()[self.start:])

    def __len__(self) -> int:
        return len(self.batches()) - self.start


class LMStream:
    """Language-model batches from one long stream (pytorch/examples word_language_model).

    ``batchify``: the first ``batch_size * (len // batch_size)`` tokens become ``batch_size``
    rows of ``C`` consecutive tokens each (row b = tokens ``b*C .. (b+1)*C - 1``; the tail
    that does not fill a row is dropped). Batch ``i`` is the window ``s = i * seq_len``:
    ``x = rows[:, s : s+T]``, ``y = rows[:, s+1 : s+1+T]`` with ``T = min(seq_len, C-1-s)``,
    so the last batch may be shorter (or left out with ``drop_last``). Batch-first
    ``(B, T)``, unlike the original's ``(T, B)``. Row b of batch i+1 continues row b of
    batch i, which is what carrying a recurrent state (or a memory) across batches needs.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, *,
                 drop_last: bool = False):
        if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.is_floating_point():
            got = (f"a {data.dim()}-D {data.dtype} tensor" if isinstance(data, torch.Tensor)
                   else type(data).__name__)
            raise ValueError(f"data: expected a 1-D integer tensor of token ids, got {got}")
        check_int("batch_size", batch_size, low=1)
        check_int("seq_len", seq_len, low=1)
        cols = data.numel() // batch_size
        if cols < 2:
            raise ValueError(f"data: {data.numel()} tokens give {cols} per row for batch_size="
                             f"{batch_size}; need at least 2 (one input and its target)")
        self.rows = data[: cols * batch_size].long().view(batch_size, cols)
        self.batch_size, self.seq_len, self.drop_last = batch_size, seq_len, drop_last
        steps = cols - 1  # positions that have a next token
        self._len = steps // seq_len if drop_last else -(-steps // seq_len)
        if self._len == 0:
            raise ValueError(f"seq_len: {seq_len} is longer than the {steps} input positions "
                             "per row, and drop_last leaves no batch")

    def __len__(self) -> int:
        return self._len

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, both ``(batch_size, T)`` long, ``y`` = ``x`` shifted by one token."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self._len:
            raise IndexError(f"i: expected a batch index in [0, {self._len}), got {i!r}")
        s = i * self.seq_len
        t = min(self.seq_len, self.rows.shape[1] - 1 - s)
        return self.rows[:, s: s + t].contiguous(), self.rows[:, s + 1: s + 1 + t].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.batch(i) for i in range(self._len))


class SequenceDataset(Dataset):
    """Token-id sequences and their labels; item ``i`` is ``(ids[i], labels[i])``."""

    def __init__(self, ids: Sequence[Sequence[int]], labels: Sequence):
        if len(ids) != len(labels):
            raise ValueError(f"ids / labels: expected the same length, got {len(ids)} "
                             f"sequences and {len(labels)} labels")
        self.ids, self.labels = list(ids), list(labels)
        self.lengths = [len(s) for s in self.ids]
        empty = [i for i, n in enumerate(self.lengths) if n == 0]
        if empty:
            raise ValueError(f"ids[{empty[0]}] is empty ({len(empty)} empty sequences); "
                             "every sequence needs at least one token")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], self.labels[i]


class _Collate:
    """Picklable collate_fn (DataLoader workers may be spawned processes)."""

    def __init__(self, pad_id, max_len, truncate, prepend):
        _check_pad_args(pad_id, max_len, truncate, prepend)
        self.kw = {"pad_id": pad_id, "max_len": max_len, "truncate": truncate,
                   "prepend": prepend}

    def __call__(self, items):
        seqs, labels = zip(*items, strict=True)
        ids, mask = pad_batch(list(seqs), **self.kw)
        return ids, mask, torch.as_tensor(labels)

    def __repr__(self) -> str:
        return f"collate({', '.join(f'{k}={v!r}' for k, v in self.kw.items())})"


def collate(pad_id: int = PAD, max_len: int | None = None, truncate: str = "head",
            prepend: int | None = None) -> _Collate:
    """A ``collate_fn`` for :class:`SequenceDataset` items giving ``(ids (B, N) long,
    padding_mask (B, N) bool, labels (B,))`` through :func:`pad_batch`."""
    return _Collate(pad_id, max_len, truncate, prepend)
