"""attnlab against the public PyPI implementations, side by side in one run.

    pip install -e ".[peers]"
    python benchmarks/peers.py --out benchmarks/out/peers.json

Pairs are run at the same settings and shapes, alternately in one process, each timed
with ``torch.utils.benchmark.Timer.blocked_autorange`` (median):

* kernel level, on the same (B, H, N, D) q, k, v:
  ``performer_pytorch.FastAttention`` vs ``performer`` (256 features);
  ``local_attention.LocalAttention`` (window 256, one window back and forward, no rotary)
  vs ``block_sparse`` with the same tri-diagonal layout of 256-blocks;
  ``reformer_pytorch.LSHAttention`` (bucket 64, 2 hashes, shared QK, same-bucket keys
  only as in the paper's eq. 3) vs ``reformer``;
* layer level (the peers ship only whole layers), x of shape (B, N, 512), 8 heads:
  ``linformer.LinformerSelfAttention`` (k=256) vs ``attnlab.nn.MultiheadAttention``
  with ``linformer``; ``nystrom_attention.NystromAttention`` (256 landmarks, no conv
  residual) vs ``nystromformer``; attnlab's layer gets the peer's weights, so both
  compute the same function.

Error is ``||out - exact|| / ||exact||`` against exact softmax attention on the same
inputs and weights (for LSH: keys = normalised queries, no self-attention, as both
implement), mean over ``--seeds`` draws. A peer that is not installed is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import torch
import torch.nn.functional as F
from _harness import machine
from torch.utils.benchmark import Timer

import attnlab

B, H, D, E = 1, 8, 64, 512


def rel_err(out, exact):
    return float((out.double() - exact.double()).norm() / exact.double().norm())


def tridiagonal(n_blocks):
    idx = torch.arange(n_blocks)
    return (idx[:, None] - idx[None, :]).abs() <= 1


def lsh_exact(q, v):
    """Full attention with keys = normalised queries and the diagonal removed."""
    k = F.normalize(q, dim=-1)
    n = q.shape[-2]
    mask = ~torch.eye(n, dtype=torch.bool)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ------------------------------------------------------------------ the pairs
def pair_performer(n):
    from performer_pytorch import FastAttention

    peer = FastAttention(dim_heads=D, nb_features=256)
    ours = attnlab.create("performer", head_dim=D, num_features=256)
    return ("kernel", lambda q, k, v: peer(q, k, v), lambda q, k, v: ours(q, k, v),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v))


def pair_local(n):
    from local_attention import LocalAttention

    peer = LocalAttention(window_size=256, causal=False, look_backward=1, look_forward=1,
                          use_rotary_pos_emb=False, autopad=True)
    ours = attnlab.create("block_sparse", block_size=256, layout=tridiagonal(-(-n // 256)))
    return ("kernel", lambda q, k, v: peer(q, k, v), lambda q, k, v: ours(q, k, v),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v))


def pair_reformer(n):
    from reformer_pytorch import LSHAttention

    # attend_across_buckets=False: the paper's eq. 3 (a key must share the query's bucket),
    # which attnlab implements; the peer's default also lets a query see other buckets
    # in its chunk, a different (denser) pattern.
    peer = LSHAttention(bucket_size=64, n_hashes=2, causal=False, attend_across_buckets=False)
    ours = attnlab.create("reformer", bucket_size=64, n_hashes=2, shared_qk=True)

    def run_peer(q, k, v):
        out = peer(q.reshape(B * H, n, D), v.reshape(B * H, n, D))[0]
        return out.reshape(B, H, n, D)

    return "kernel", run_peer, lambda q, k, v: ours(q, q, v), lambda q, k, v: lsh_exact(q, v)


def _copy_linear(dst, w):
    with torch.no_grad():
        dst.weight.copy_(w)


def pair_linformer(n):
    from linformer import LinformerSelfAttention

    peer = LinformerSelfAttention(dim=E, seq_len=n, k=256, heads=H)
    with torch.no_grad():
        peer.to_out.bias.zero_()
    ours = attnlab.nn.MultiheadAttention(E, H, mechanism="linformer", k=256, max_seq_len=n,
                                         bias=False)
    exact = attnlab.nn.MultiheadAttention(E, H, mechanism="sdpa", bias=False)
    for mha in (ours, exact):
        for a, b in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"),
                     ("out_proj", "to_out")):
            _copy_linear(getattr(mha, a), getattr(peer, b).weight)
    with torch.no_grad():
        ours.attn.E.copy_(peer.proj_k.T)
        ours.attn.F.copy_(peer.proj_v.T)
    return "layer", peer, ours, exact


def pair_nystrom(n):
    from nystrom_attention import NystromAttention

    peer = NystromAttention(dim=E, dim_head=D, heads=H, num_landmarks=256, pinv_iterations=6,
                            residual=False)
    with torch.no_grad():
        peer.to_out[0].bias.zero_()
    ours = attnlab.nn.MultiheadAttention(E, H, mechanism="nystromformer", num_landmarks=256,
                                         bias=False)
    exact = attnlab.nn.MultiheadAttention(E, H, mechanism="sdpa", bias=False)
    wq, wk, wv = peer.to_qkv.weight.chunk(3, dim=0)
    for mha in (ours, exact):
        _copy_linear(mha.q_proj, wq)
        _copy_linear(mha.k_proj, wk)
        _copy_linear(mha.v_proj, wv)
        _copy_linear(mha.out_proj, peer.to_out[0].weight)
    return "layer", peer, ours, exact


PAIRS = {"performer": ("performer_pytorch", pair_performer),
         "local": ("local_attention", pair_local),
         "reformer": ("reformer_pytorch", pair_reformer),
         "linformer": ("linformer", pair_linformer),
         "nystromformer": ("nystrom_attention", pair_nystrom)}


def time_it(fn, inputs, backward, min_run_time):
    def step():
        out = fn(*inputs)
        if backward:
            out.backward(torch.ones_like(out))
            for t in inputs:
                t.grad = None
        return out

    step()  # warm-up (first-call allocations, lazy buffers)
    m = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return m.blocked_autorange(min_run_time=min_run_time).median


def measure(name, n, seeds, min_run_time):
    module, build = PAIRS[name]
    if importlib.util.find_spec(module) is None:
        return {"pair": name, "N": n, "status": f"skipped: {module} not installed"}
    torch.manual_seed(0)
    kind, peer, ours, exact = build(n)
    errs = {"peer": [], "attnlab": []}
    for s in range(seeds):
        g = torch.Generator().manual_seed(s)
        shape = (B, H, n, D) if kind == "kernel" else (B, n, E)
        inputs = [torch.randn(shape, generator=g) for _ in range(3 if kind == "kernel" else 1)]
        with torch.no_grad():
            ref = exact(*inputs)
            errs["peer"].append(rel_err(peer(*inputs), ref))
            errs["attnlab"].append(rel_err(ours(*inputs), ref))
    row = {"pair": name, "N": n, "status": "ok",
           "err_peer": sum(errs["peer"]) / seeds, "err_attnlab": sum(errs["attnlab"]) / seeds}
    for p, backward in (("fwd", False), ("fwd+bwd", True)):
        inputs = [t.requires_grad_(backward) for t in inputs]
        with torch.set_grad_enabled(backward):
            row[f"{p}_peer_s"] = time_it(peer, inputs, backward, min_run_time)
            row[f"{p}_attnlab_s"] = time_it(ours, inputs, backward, min_run_time)
        row[f"{p}_speedup"] = row[f"{p}_peer_s"] / row[f"{p}_attnlab_s"]
    return row


def markdown(rows):
    out = ["| pair | N | fwd peer (s) | fwd attnlab (s) | fwd × | fwd+bwd peer (s) "
           "| fwd+bwd attnlab (s) | fwd+bwd × | error peer | error attnlab |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['pair']} | {r['N']} | {r['status']} |||||||| ")
            continue
        out.append(
            f"| {r['pair']} | {r['N'] // 1024}K | {r['fwd_peer_s']:.3f} | {r['fwd_attnlab_s']:.3f} "
            f"| {r['fwd_speedup']:.2f} | {r['fwd+bwd_peer_s']:.3f} | {r['fwd+bwd_attnlab_s']:.3f} "
            f"| {r['fwd+bwd_speedup']:.2f} | {r['err_peer']:.4f} | {r['err_attnlab']:.4f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    info = {"machine": machine(), "command": " ".join(sys.argv), "results": []}
    for name in a.pairs:
        for n in a.n:
            row = measure(name, n, a.seeds, a.min_run_time)
            info["results"].append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(info, f, indent=1)
    print(markdown(info["results"]))


if __name__ == "__main__":
    main()
