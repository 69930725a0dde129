"""Batching: pad_batch against a plain-Python reference, the bucketing sampler's guarantees,
LMStream against pytorch/examples' batchify/get_batch, and the Dataset/collate pair."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from attnlab.data.batching import (
    BucketBatchSampler,
    LMStream,
    SequenceDataset,
    collate,
    pad_batch,
    padding_fraction,
)
from attnlab.data.tokenize import CLS, PAD

# ---------------------------------------------------------------- pad_batch


def _reference_pad(seqs, pad_id, max_len, truncate, prepend):
    """Padding written out position by position, with the truncation rules spelled out."""
    rows = []
    for s in seqs:
        keep = list(s)
        room = None if max_len is None else max_len - (0 if prepend is None else 1)
        if room is not None and len(keep) > room:
            if truncate == "head":
                keep = keep[:room]
            elif truncate == "tail":
                keep = keep[len(keep) - room:]
            else:
                n_head = room // 4
                n_tail = room - n_head
                keep = keep[:n_head] + keep[len(keep) - n_tail:]
        rows.append(([prepend] if prepend is not None else []) + keep)
    width = max(len(r) for r in rows)
    ids = [[r[j] if j < len(r) else pad_id for j in range(width)] for r in rows]
    mask = [[j >= len(r) for j in range(width)] for r in rows]
    return ids, mask


@given(
    seqs=st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=40), min_size=1, max_size=6),
    max_len=st.one_of(st.none(), st.integers(2, 14)),
    truncate=st.sampled_from(["head", "tail", "head+tail"]),
    prepend=st.one_of(st.none(), st.just(CLS)),
    pad_id=st.sampled_from([PAD, 7]),
)
def test_pad_batch_matches_reference(seqs, max_len, truncate, prepend, pad_id):
    ids, mask = pad_batch(seqs, pad_id=pad_id, max_len=max_len, truncate=truncate,
                          prepend=prepend)
    ref_ids, ref_mask = _reference_pad(seqs, pad_id, max_len, truncate, prepend)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.tolist() == ref_ids
    assert mask.tolist() == ref_mask
    if max_len is not None:
        assert ids.shape[1] <= max_len
    # tensors and lists give the same batch
    again = pad_batch([torch.tensor(s) for s in seqs], pad_id=pad_id, max_len=max_len,
                      truncate=truncate, prepend=prepend)
    assert torch.equal(again[0], ids) and torch.equal(again[1], mask)


def test_pad_batch_worked_examples():
    seq = list(range(1, 11))  # 1..10
    ids, mask = pad_batch([seq, [42]], max_len=8, truncate="head+tail")
    assert ids.tolist() == [[1, 2, 5, 6, 7, 8, 9, 10], [42, 0, 0, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[False] * 8, [False] + [True] * 7]
    long = list(range(1, 21))  # budget 12: first 12 // 4 = 3, last 9
    assert pad_batch([long], max_len=12, truncate="head+tail")[0].tolist() == [
        [1, 2, 3, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    ids, _ = pad_batch([seq], max_len=9, truncate="head+tail", prepend=CLS)
    assert ids.tolist() == [[CLS, 1, 2, 5, 6, 7, 8, 9, 10]]  # budget 8 after CLS
    assert pad_batch([seq], max_len=3, truncate="tail")[0].tolist() == [[8, 9, 10]]
    assert pad_batch([seq], max_len=3)[0].tolist() == [[1, 2, 3]]
    # a token equal to pad_id inside a sequence is not padding: the mask comes from lengths
    ids, mask = pad_batch([[0, 5, 0], [5]])
    assert mask.tolist() == [[False, False, False], [False, True, True]]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"seqs": [[1], [], [2]]}, r"seqs\[1\] is empty"),
    ({"seqs": []}, "seqs: expected at least one"),
    ({"seqs": [[1]], "truncate": "haed"}, r"truncate: .*did you mean 'head'"),
    ({"seqs": [[1]], "max_len": 0}, "max_len must be >= 1; got 0"),
    ({"seqs": [[1]], "max_len": 1, "prepend": CLS}, "max_len must be >= 2; got 1"),
    ({"seqs": [[1]], "pad_id": -1}, "pad_id must be >= 0; got -1"),
    ({"seqs": [[1]], "multiple": 0}, "multiple must be >= 1; got 0"),
    ({"seqs": [[1]], "multiple": 3, "max_len": 8}, "multiple: expected a divisor of max_len=8"),
])
def test_pad_batch_errors_name_the_argument(kwargs, match):
    seqs = kwargs.pop("seqs")
    with pytest.raises(ValueError, match=match):
        pad_batch(seqs, **kwargs)


@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=6),
       multiple=st.sampled_from([1, 2, 4, 8, 16, 32]))
def test_pad_batch_multiple_pads_up_and_masks_the_extra_slots(lengths, multiple):
    seqs = [list(range(1, n + 1)) for n in lengths]
    ids, mask = pad_batch(seqs, multiple=multiple, max_len=32)
    plain_ids, plain_mask = pad_batch(seqs, max_len=32)
    n = plain_ids.shape[1]
    assert ids.shape[1] % multiple == 0 and n <= ids.shape[1] < n + multiple
    assert torch.equal(ids[:, :n], plain_ids) and torch.equal(mask[:, :n], plain_mask)
    assert mask[:, n:].all() and (ids[:, n:] == PAD).all()


# ---------------------------------------------------------------- BucketBatchSampler


def _lengths(n=1000, seed=0):
    return np.random.default_rng(seed).lognormal(4.0, 0.8, n).astype(int) + 1


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=120),
    batch_size=st.integers(1, 9),
    mult=st.integers(1, 4),
    shuffle=st.booleans(),
    epoch=st.integers(0, 3),
    use_tokens=st.booleans(),
)
def test_sampler_yields_every_index_once(lengths, batch_size, mult, shuffle, epoch, use_tokens):
    max_tokens = 3 * max(lengths) if use_tokens else None
    s = BucketBatchSampler(lengths, batch_size, max_tokens=max_tokens, shuffle=shuffle,
                           bucket_size_multiplier=mult, seed=5)
    s.set_epoch(epoch)
    batches = list(s)
    assert len(batches) == len(s)
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    if max_tokens is not None:
        assert all(len(b) * max(lengths[i] for i in b) <= max_tokens for b in batches)


def test_sampler_order_is_a_function_of_seed_and_epoch():
    lengths = _lengths(500)
    a, b = BucketBatchSampler(lengths, 16, seed=3), BucketBatchSampler(lengths, 16, seed=3)
    a.set_epoch(2)
    b.set_epoch(1)
    list(b)  # b has served another epoch before: must not matter
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(b) != list(a)
    assert list(BucketBatchSampler(lengths, 16, seed=4)) != list(BucketBatchSampler(lengths, 16))
    assert a.batches(2) == list(a) and a.batches(3) == list(b)


def test_bucketing_lowers_padding_against_random_batches():
    lengths = _lengths(2000)
    bucketed = BucketBatchSampler(lengths, 32, seed=0).batches(0)
    perm = np.random.default_rng(0).permutation(len(lengths))
    random_batches = [perm[i:i + 32].tolist() for i in range(0, len(perm), 32)]
    pad_bucket = padding_fraction(lengths, bucketed)
    pad_random = padding_fraction(lengths, random_batches)
    assert pad_bucket < pad_random / 3, (pad_bucket, pad_random)
    # the bigger the pool, the less padding (pools of one batch = no bucketing at all)
    one = BucketBatchSampler(lengths, 32, bucket_size_multiplier=1).batches(0)
    assert pad_bucket < padding_fraction(lengths, one)


def test_max_tokens_budget_is_respected_and_used():
    lengths = _lengths(800)
    s = BucketBatchSampler(lengths, max_tokens=4096, seed=1)
    batches = s.batches(0)
    cost = [len(b) * max(lengths[b]) for b in batches]
    assert max(cost) <= 4096
    # greedy cutting: adding the next index of the pool would have broken the budget, so
    # most batches fill a good part of it (short sequences come many to a batch)
    assert np.median(cost) > 4096 / 2
    assert max(len(b) for b in batches) > 4 * min(len(b) for b in batches)
    capped = BucketBatchSampler(lengths, 8, max_tokens=4096).batches(0)
    assert max(len(b) for b in capped) <= 8


def test_resume_by_skipping_gives_the_same_remaining_batches():
    lengths = _lengths(300)
    full = BucketBatchSampler(lengths, 10, seed=7)
    full.set_epoch(4)
    expected = list(full)
    fresh = BucketBatchSampler(lengths, 10, seed=7)  # e.g. after a restart
    fresh.set_epoch(4, start=13)
    assert len(fresh) == len(expected) - 13
    assert list(fresh) == expected[13:]
    fresh.set_epoch(5)  # the next epoch starts from its beginning again
    assert len(fresh) == len(fresh.batches(5))
    with pytest.raises(ValueError, match=rf"start: .*\[0, {len(expected)}\]"):
        fresh.set_epoch(4, start=len(expected) + 1)


def test_drop_last_and_no_shuffle():
    lengths = list(range(1, 104))  # 103 items
    s = BucketBatchSampler(lengths, 10, drop_last=True, bucket_size_multiplier=3)
    batches = list(s)
    assert all(len(b) == 10 for b in batches) and len(batches) == len(s) == 10
    assert len(set(itertools.chain.from_iterable(batches))) == 100
    ordered = BucketBatchSampler(lengths[::-1], 10, shuffle=False, bucket_size_multiplier=3)
    first = ordered.batches(0)[0]  # pool 0 = the 30 longest (reversed input), sorted
    assert first == list(range(29, 19, -1))
    assert ordered.batches(0) == ordered.batches(1)


def test_padding_fraction_by_hand():
    assert padding_fraction([1, 2, 3, 4], [[0, 1], [2, 3]]) == pytest.approx(2 / 12)
    assert padding_fraction([5, 5], [[0, 1]]) == 0.0


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    (([3, 0, 2], 2), {}, r"lengths\[1\]: expected >= 1, got 0"),
    (([3, 9], 2), {"max_tokens": 8}, r"lengths\[1\] = 9 exceeds max_tokens = 8"),
    (([3],), {}, "batch_size / max_tokens"),
    (([3], 0), {}, "batch_size must be >= 1; got 0"),
    (([3], 2), {"max_tokens": 10, "drop_last": True}, "drop_last: only for count"),
    (([], 2), {}, "lengths: expected a non-empty"),
])
def test_sampler_errors_name_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BucketBatchSampler(*args, **kwargs)


# ---------------------------------------------------------------- LMStream


def test_lm_stream_hand_computed():
    lm = LMStream(torch.arange(26), batch_size=4, seq_len=3)
    # batchify: 26 // 4 = 6 tokens per row (24, 25 dropped); 5 input positions -> 2 batches
    assert len(lm) == 2
    x, y = lm.batch(0)
    assert x.tolist() == [[0, 1, 2], [6, 7, 8], [12, 13, 14], [18, 19, 20]]
    assert y.tolist() == [[1, 2, 3], [7, 8, 9], [13, 14, 15], [19, 20, 21]]
    x, y = lm.batch(1)
    assert x.tolist() == [[3, 4], [9, 10], [15, 16], [21, 22]]
    assert y.tolist() == [[4, 5], [10, 11], [16, 17], [22, 23]]
    assert len(LMStream(torch.arange(26), 4, 3, drop_last=True)) == 1
    with pytest.raises(IndexError, match=r"i: expected a batch index in \[0, 2\), got 2"):
        lm.batch(2)


def _pytorch_examples_batches(data, bsz, bptt):
    """pytorch/examples word_language_model/main.py: batchify, then get_batch(source, i)."""
    nbatch = data.size(0) // bsz
    source = data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()  # (nbatch, bsz)
    out = []
    for i in range(0, source.size(0) - 1, bptt):
        seq_len = min(bptt, len(source) - 1 - i)
        out.append((source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)))
    return out


@given(n=st.integers(2, 300), bsz=st.integers(1, 7), bptt=st.integers(1, 40))
def test_lm_stream_matches_pytorch_examples(n, bsz, bptt):
    data = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n))
    if n // bsz < 2:
        with pytest.raises(ValueError, match="data: .*need at least 2"):
            LMStream(data, bsz, bptt)
        return
    lm = LMStream(data, bsz, bptt)
    ref = _pytorch_examples_batches(data, bsz, bptt)
    assert len(lm) == len(ref)
    for (x, y), (rx, ry) in zip(lm, ref, strict=True):
        assert torch.equal(x, rx.t()) and x.is_contiguous()
        assert torch.equal(y.t().reshape(-1), ry)  # the original flattens seq-first targets


def test_lm_stream_errors():
    with pytest.raises(ValueError, match="data: expected a 1-D integer tensor"):
        LMStream(torch.zeros(10), 2, 2)
    with pytest.raises(ValueError, match="seq_len must be >= 1; got 0"):
        LMStream(torch.arange(10), 2, 0)


# ---------------------------------------------------------------- Dataset + collate


def test_dataset_sampler_collate_in_a_dataloader():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, 100, rng.integers(1, 40)).tolist() for _ in range(200)]
    labels = [s[0] % 3 for s in seqs]  # recoverable from the ids, to check the pairing
    ds = SequenceDataset(seqs, labels)
    sampler = BucketBatchSampler(ds.lengths, 16, seed=0)
    fn = collate(max_len=20, truncate="head", prepend=CLS)
    assert pickle.loads(pickle.dumps(fn)).kw == fn.kw  # spawn-started workers need this
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=fn)
    assert len(loader) == len(sampler)
    seen = 0
    for ids, mask, y in loader:
        assert ids.shape == mask.shape and ids.shape[1] <= 20
        assert (ids[:, 0] == CLS).all() and not mask[:, 0].any()
        assert torch.equal(ids[:, 1] % 3, y)
        assert ((ids == PAD) == mask).all()  # ids here are never 0, so pad <=> mask
        seen += len(y)
    assert seen == 200


def test_dataset_errors():
    with pytest.raises(ValueError, match="ids / labels: .*3 sequences and 2 labels"):
        SequenceDataset([[1], [2], [3]], [0, 1])
    with pytest.raises(ValueError, match=r"ids\[1\] is empty"):
        SequenceDataset([[1], []], [0, 1])
    with pytest.raises(ValueError, match="truncate: "):
        collate(truncate="middle")
