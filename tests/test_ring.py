"""Ring attention: P processes on the loopback address equal one process's exact attention.

Evidence:

* P = 2 and 4 ranks (gloo, spawned processes, each launch bounded by a timeout that kills
  the group) give the outputs and the gradients dQ, dK, dV of exact attention over the
  whole sequence: against an independent float64 softmax (conftest's, gradients by
  autograd through it), within 1e-5 for float32 and 1e-10 for float64, causal and not,
  for the zigzag, striped and contiguous layouts; on subgroups of a 4-rank world too;
* key padding travels with its keys, and padding a length that does not divide (the
  documented remedy) gives the unpadded attention; a length that does not divide is a
  ValueError naming the divisor (:func:`shard` and the mechanism on the ranks);
* under causal masking, the tiles computed and skipped on each rank are the ones the
  global positions say (counted independently here), and zigzag / striped give every rank
  the same work while contiguous does not;
* a rank that raises fails the whole job with its error, well within the timeout; a rank
  that hangs is killed at the timeout;
* with no process group (P = 1) it is exact attention (SDPA), forward and gradcheck;
  the benchmark command reports per-rank rows.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import naive_attention_f64
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.ring  # noqa: F401
from attnlab.bench.ring import RingJobError, launch
from attnlab.cli.main import main as cli_main
from attnlab.mechanisms.ring import positions, shard, unshard

LAYOUTS = ("zigzag", "striped", "contiguous")
B, H, N, D, BLOCK = 2, 2, 24, 4, 3  # N: a multiple of 2P for P = 2, 4
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
TIMEOUT = 60.0
PAD_REAL = 22  # padded to N = 24 with a key-padding mask


def inputs(dtype, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(dtype)
            for _ in range(4)]  # q, k, v, and the output's gradient


def run_ring(layout, causal, dtype, rank, P, full, keep=None, group=None, **hp):
    """This rank's output and gradients for ``full`` sharded in ``layout``."""
    q, k, v, dout = (shard(t, layout, rank, P).requires_grad_(i < 3) for i, t in enumerate(full))
    mech = attnlab.create("ring", layout=layout, block_size=BLOCK, **hp).to(dtype)
    mech.process_group = group
    mask = None if keep is None else shard(keep[:, None, :, None], layout, rank, P)[..., 0]
    out = mech(q, k, v, is_causal=causal,
               attn_mask=None if mask is None else mask[:, :, None, :])
    out.backward(dout)
    return {"out": out.detach(), "grads": [t.grad for t in (q, k, v)],
            "tiles": (mech.stats.tiles_computed, mech.stats.tiles_skipped)}


# ------------------------------------------------------------- in the ranks
def cases_worker(rank, P, out_dir):
    """Every case on this rank; one file of results (errors recorded as their text)."""
    res = {}
    for layout in LAYOUTS:
        for causal in (False, True):
            for dtype in TOL:
                res[layout, causal, dtype] = run_ring(layout, causal, dtype, rank, P,
                                                      inputs(dtype))
            res["alibi", layout, causal] = run_ring(layout, causal, torch.float64, rank, P,
                                                    inputs(torch.float64, seed=7), alibi=True)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[:, PAD_REAL:] = False  # the padding that makes 22 tokens a multiple of 2P
    pad = torch.ones(B, H, N - PAD_REAL, D, dtype=torch.float64)
    full = [torch.cat([t, pad * (9 if i < 3 else 0)], 2)  # padded rows dropped: dO = 0
            for i, t in enumerate(inputs(torch.float64, n=PAD_REAL, seed=5))]
    for causal in (False, True):
        res["padded", causal] = run_ring("zigzag", causal, torch.float64, rank, P, full, keep)
    n_odd = 5  # zigzag needs each rank's 2 chunks equal: n even
    try:
        attnlab.create("ring", layout="zigzag")(*(torch.randn(1, 1, n_odd, D) for _ in "qkv"))
    except ValueError as e:
        res["odd"] = str(e)
    if P == 4:  # two rings of two: ranks {0, 1} and {2, 3}, each its own sequence
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        mine = groups[rank // 2]
        res["subgroup"] = run_ring("striped", True, torch.float64, rank % 2, 2,
                                   inputs(torch.float64, seed=10 + rank // 2), group=mine)
    torch.save(res, f"{out_dir}/rank{rank}.pt")


def raising_worker(rank, P):
    if rank == 1:
        raise ValueError("boom on rank 1")
    run_ring("zigzag", True, torch.float32, rank, P, inputs(torch.float32))  # waits on rank 1


def hanging_worker(rank, P):
    if rank == 1:
        time.sleep(120)
    dist.barrier()


# ------------------------------------------------------------- in this process
@pytest.fixture(scope="module", params=[2, 4], ids=["P2", "P4"])
def ranks(request, tmp_path_factory):
    P = request.param
    out = tmp_path_factory.mktemp(f"ring{P}")
    launch(cases_worker, P, (str(out),), timeout_s=TIMEOUT)
    return P, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(P)]


def reference(full, causal, mask=None):
    """Output and dQ, dK, dV of exact attention in float64, written independently."""
    q, k, v = (t.detach().double().requires_grad_() for t in full[:3])
    out = naive_attention_f64(q, k, v, mask=mask, is_causal=causal)
    out.backward(full[3].double())
    return out.detach(), [t.grad for t in (q, k, v)]


def gathered(results, key, layout):
    """The whole sequence's output and gradients from every rank's shard."""
    rs = [r[key] for r in results]
    return (unshard([r["out"] for r in rs], layout),
            [unshard([r["grads"][i] for r in rs], layout) for i in range(3)])


@pytest.mark.parametrize("dtype", list(TOL), ids=["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_p_ranks_equal_exact_attention(ranks, layout, causal, dtype):
    P, results = ranks
    out, grads = gathered(results, (layout, causal, dtype), layout)
    ref_out, ref_grads = reference(inputs(dtype), causal)
    tol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=tol)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol, msg=f"d{name}")


def alibi_reference(full, causal):
    """ALiBi (Press et al. 2022) written out in float64: softmax(q k^T / sqrt(D) - m_h d_ij) V
    with d_ij = i - j (causal, j <= i) or |i - j|, m_h = 2^(-8 h / H) for H a power of 2."""
    q, k, v = (t.detach().double().requires_grad_() for t in full[:3])
    i = torch.arange(N, dtype=torch.float64)
    d = i[:, None] - i[None, :]
    m = torch.tensor([2.0 ** (-8 * h / H) for h in range(1, H + 1)], dtype=torch.float64)
    s = q @ k.transpose(-1, -2) / D ** 0.5 - m[:, None, None] * (d if causal else d.abs())
    if causal:
        s = s.masked_fill(d < 0, float("-inf"))
    out = torch.softmax(s, -1) @ v
    out.backward(full[3].double())
    return out.detach(), [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_alibi_biases_every_shard_at_its_global_positions(ranks, layout, causal):
    """ALiBi inside the ring: each rank's tiles get -m_h (i - j) at the global positions,
    so the sharded sequence equals the whole one's ALiBi attention, gradients included."""
    _, results = ranks
    out, grads = gathered(results, ("alibi", layout, causal), layout)
    ref_out, ref_grads = alibi_reference(inputs(torch.float64, seed=7), causal)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"d{name}")
    plain = reference(inputs(torch.float64, seed=7), causal)[0]
    assert (out - plain).abs().max() > 1e-2  # the bias is there: not softmax attention


@pytest.mark.parametrize("causal", [False, True])
def test_padding_to_a_multiple_gives_the_unpadded_attention(ranks, causal):
    _, results = ranks
    out, grads = gathered(results, ("padded", causal), "zigzag")
    full = inputs(torch.float64, n=PAD_REAL, seed=5)
    ref_out, ref_grads = reference(full, causal)
    torch.testing.assert_close(out[:, :, :PAD_REAL], ref_out, rtol=0, atol=1e-10)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got[:, :, :PAD_REAL], want, rtol=0, atol=1e-10)
    assert (grads[1][:, :, PAD_REAL:] == 0).all() and (grads[2][:, :, PAD_REAL:] == 0).all()


def test_a_length_that_does_not_divide_is_an_error_naming_the_divisor(ranks):
    P, results = ranks
    for r in results:  # each rank holds 5 tokens: N = 5P is no multiple of 2P
        assert r["odd"] == (f"ring: layout 'zigzag' cuts the sequence into 2P = {2 * P} equal "
                            f"chunks; N = {5 * P} is not a multiple of {2 * P} (pad it to "
                            f"{5 * P + P} and mask the padding with a key-padding mask)")
    x = torch.zeros(1, 1, 10, 2)
    with pytest.raises(ValueError, match=r"shard: layout 'striped' cuts the sequence into "
                                         r"P = 4 equal shards; N = 10 is not a multiple of 4"):
        shard(x, "striped", 0, 4)
    with pytest.raises(ValueError, match=r"2P = 4 equal chunks; N = 10 is not a multiple of "
                                         r"4 \(pad it to 12"):
        shard(x[:, :, :10], "zigzag", 1, 2)
    with pytest.raises(ValueError, match=r"layout must be one of \['zigzag', 'striped', "
                                         r"'contiguous'\]; got 'ring'"):
        shard(x, "ring", 0, 2)


def test_subgroups_are_rings_of_their_own(ranks):
    P, results = ranks
    if P != 4:
        pytest.skip("subgroups in the 4-rank world")
    for pair in (0, 1):
        out, grads = gathered(results[2 * pair:2 * pair + 2], "subgroup", "striped")
        ref_out, ref_grads = reference(inputs(torch.float64, seed=10 + pair), True)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def expected_tiles(layout, rank, P, causal):
    """``(computed, skipped)`` of one pass, from the layout's definition written here."""
    n = N // P
    if layout == "contiguous":
        pos = lambda r: list(range(r * n, (r + 1) * n))  # noqa: E731
    elif layout == "striped":
        pos = lambda r: list(range(r, N, P))  # noqa: E731
    else:
        c = N // (2 * P)
        pos = lambda r: [*range(r * c, (r + 1) * c),  # noqa: E731
                         *range((2 * P - 1 - r) * c, (2 * P - r) * c)]
    blocks = [pos(rank)[i:i + BLOCK] for i in range(0, n, BLOCK)]
    done = skipped = 0
    for src in range(P):
        key_blocks = [pos(src)[j:j + BLOCK] for j in range(0, n, BLOCK)]
        for qb in blocks:
            for kb in key_blocks:
                dead = causal and min(kb) > max(qb)  # every key after every query
                skipped, done = skipped + dead, done + (not dead)
    return done, skipped


@pytest.mark.parametrize("layout", LAYOUTS)
def test_causal_skips_the_blocks_the_mask_removes(ranks, layout):
    P, results = ranks
    per_rank = (N // P // BLOCK) ** 2 * P  # tiles of one pass without a mask
    for causal in (False, True):
        work, skips = [], []
        for rank, r in enumerate(results):
            done, skipped = expected_tiles(layout, rank, P, causal)
            # forward and backward each visit the same tiles
            assert r[layout, causal, torch.float64]["tiles"] == (2 * done, 2 * skipped)
            work.append(done)
            skips.append(skipped)
        if causal:  # every rank skips some; equal work per rank, but for contiguous
            assert min(skips) > 0
            assert (len(set(work)) == 1) == (layout != "contiguous")
        else:
            assert work == [per_rank] * P and skips == [0] * P


def test_a_rank_that_raises_fails_the_job_with_its_error():
    start = time.monotonic()
    with pytest.raises(RingJobError,
                       match=r"(?s)rank 1 of 2 failed first:.*ValueError: boom on rank 1"):
        launch(raising_worker, 2, timeout_s=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT / 2


def test_a_rank_that_hangs_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(RingJobError, match=r"ran past 4 s \(ranks \[.*1.*\] still running"):
        launch(hanging_worker, 2, timeout_s=4.0)
    assert time.monotonic() - start < 15


def test_nccl_without_gpus_is_refused_clearly():
    if torch.cuda.device_count() >= 2:
        pytest.skip("GPUs present: the nccl test below runs")
    with pytest.raises(RingJobError, match=r"backend nccl needs 2 GPUs \(one per rank\)"):
        launch(hanging_worker, 2, backend="nccl")


def nccl_worker(rank, P, out_dir):
    full = [t.cuda(rank) for t in inputs(torch.float32)]
    r = run_ring("zigzag", True, torch.float32, rank, P, full)
    torch.save({k: v for k, v in r.items() if k != "tiles"}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl: needs 2 GPUs")
def test_nccl_on_two_gpus_equals_exact_attention(tmp_path):
    launch(nccl_worker, 2, (str(tmp_path),), backend="nccl", timeout_s=TIMEOUT)
    rs = [torch.load(tmp_path / f"rank{r}.pt", map_location="cpu") for r in range(2)]
    out = unshard([r["out"] for r in rs], "zigzag")
    torch.testing.assert_close(out.double(), reference(inputs(torch.float32), True)[0],
                               rtol=0, atol=1e-5)


# ------------------------------------------------------------- layouts, P = 1
@settings(max_examples=30)
@given(P=st.integers(1, 5), chunks=st.integers(1, 4), layout=st.sampled_from(LAYOUTS))
def test_layouts_place_tokens_as_defined(P, chunks, layout):
    n_total = 2 * P * chunks
    x = torch.arange(n_total, dtype=torch.float64).view(1, 1, n_total, 1)
    parts = [shard(x, layout, r, P) for r in range(P)]
    assert torch.equal(unshard(parts, layout), x)
    for r, part in enumerate(parts):
        got = part.flatten().long()
        assert torch.equal(got, positions(layout, r, P, n_total // P))
        c = n_total // (2 * P)
        want = {"contiguous": list(range(r * n_total // P, (r + 1) * n_total // P)),
                "striped": [t for t in range(n_total) if t % P == r],
                "zigzag": [t for t in range(n_total) if t // c in (r, 2 * P - 1 - r)]}
        assert got.tolist() == want[layout]


@settings(max_examples=25)
@given(n=st.integers(1, 20), block=st.integers(1, 8), causal=st.booleans(),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_one_process_equals_sdpa(n, block, causal, layout, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 5, generator=g) for _ in range(3))
    mech = attnlab.create("ring", layout=layout, block_size=block)
    assert mech.world() == (0, 1)
    out = mech(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                               rtol=0, atol=1e-5)


def test_one_process_gradcheck():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    mech = attnlab.create("ring", block_size=2)
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, c, causal=causal: mech(a, b, c, is_causal=causal), (q, k, v))


def test_dropout_is_refused():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match=r"ring: dropout_p must be 0 .*; got 0.1"):
        attnlab.create("ring")(q, q, q, dropout_p=0.1)


# ------------------------------------------------------------- the benchmark
def test_bench_ring_reports_every_rank(tmp_path, capsys):
    out = tmp_path / "ring.json"
    rc = cli_main(["bench", "ring", "--procs", "2", "--n", "64", "--layouts", "contiguous",
                   "zigzag", "--causal", "--heads", "1", "--head-dim", "8", "--block-size",
                   "8", "--repeats", "1", "--no-progress", "--markdown", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [(r["P"], r["layout"], r["status"]) for r in rows] == [
        (2, "contiguous", "ok"), (2, "zigzag", "ok")]
    for r in rows:
        assert [x["rank"] for x in r["ranks"]] == [0, 1]
        assert r["bytes_sent"] == 32 * (8 + 8) * 4  # one shard of [K, V] passed on
        assert 0 <= r["comm_share"] <= 1 and r["peak_mem_bytes"] >= 0
    contiguous, zigzag = rows
    assert (contiguous["tiles_max"], contiguous["tiles_min"]) == contiguous_tiles(64, 8)
    assert zigzag["tiles_max"] == zigzag["tiles_min"]
    text = capsys.readouterr().out
    assert "| 2 | 64 | contiguous | fwd causal |" in text


def contiguous_tiles(n_total, block):
    """(max, min) tiles computed per rank of a 2-rank contiguous causal forward: rank 0
    its own triangle, rank 1 its triangle and the whole of rank 0's shard."""
    n = n_total // 2
    per_rank = [(n // block) * (n // block + 1) // 2 + r * (n // block) ** 2 for r in (0, 1)]
    return max(per_rank), min(per_rank)
