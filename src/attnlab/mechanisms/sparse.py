"""Sparse and structured attention patterns: softmax attention restricted to a set ``S_i``.

.. math::

    \\mathrm{out}_i = \\mathrm{softmax}_{j \\in S_i}(\\tau\\, q_i \\cdot k_j + M_{ij})\\, v_j

Each mechanism only says which pairs ``(i, j)`` are in ``S_i`` (and ``is_causal`` adds
``j <= i``); the engine :mod:`attnlab.mechanisms._engines.blocksparse` computes them
without ever forming the ``N x N`` matrix. ``b`` is ``block_size``, ``w`` the window,
``d`` the dilation, ``g`` the number of global tokens, ``r`` the number of random blocks,
``l``/``c`` the Sparse Transformer's stride and summary width.

* ``local``           (Parmar et al. 2018):  ``floor(i/b) = floor(j/b)``
* ``sliding_window``  (Beltagy et al. 2020): ``|i - j| <= w//2``; causal ``i-w < j <= i``
* ``dilated_window``  (Beltagy et al. 2020): ``j = i + d t``, ``|t| <= w//2``; causal
  ``t in (-w, 0]``
* ``longformer``      (Beltagy et al. 2020): window ``or`` ``i`` global ``or`` ``j`` global
* ``bigbird``         (Zaheer et al. 2020):  window ``or`` global ``or`` ``r`` random key
  blocks per query block (drawn from ``seed``)
* ``sparse_transformer`` (Child et al. 2019): strided ``i-l <= j <= i+l or (i-j) % l = 0``;
  fixed ``floor(i/l) = floor(j/l) or j % l >= l - c``
* ``block_sparse``    (any user layout ``A``): ``A[floor(i/b), floor(j/b)]``

For ``longformer``, ``bigbird`` and ``sparse_transformer`` the causal form is the
intersection of the pattern with ``j <= i`` (as in Child et al.'s autoregressive
patterns); ``sliding_window`` and ``dilated_window`` put their whole window in the past
when causal, as causal local attention does. Every mechanism accepts any ``N`` (the last
block is padded internally) and any ``attn_mask`` (a pair must be allowed by both).

Cost: with ``K`` keys scored per query (the pattern's keys rounded out to whole blocks),
time is ``O(N K D)`` and memory ``O(N K (1 + D/b))`` with autograd: the scores, plus the
key/value blocks each query block gathers (``N K D / b``); the complexity strings spell
``K`` out. A forward without autograd holds one chunk of them at a time (see
:mod:`attnlab.mechanisms._engines.blocksparse`): ``O(N D)`` above its inputs.

Decoding (registry flag ``decode_state``): the causal rows of ``local``,
``sliding_window``, ``dilated_window`` and ``longformer`` read keys within a span ``W``
(``b``, ``w``, ``(w - 1) d + 1``, ``w//2 + 1``) plus, for ``longformer``, the global tokens:
their state is a rolling buffer of the last ``W - 1`` keys and values (and, for
``longformer``, positions ``0 .. max(G)``), so a token costs ``O(W D)``
(:mod:`attnlab.mechanisms._engines.window_decode`). ``longformer`` decodes only with
global tokens counted from the start (one counted from the end moves as the sequence
grows). ``bigbird``, ``sparse_transformer`` and ``block_sparse`` keep no such state: their
random blocks, strided columns, summary columns and layouts reach keys arbitrarily far
back (and depend on ``N``), so a causal row may need every past key.
"""

from __future__ import annotations

import hashlib
import math

import torch

from attnlab.mechanisms._engines.blocksparse import SparsePattern
from attnlab.mechanisms._engines.sparse_flex import BACKENDS, SparseMechanism
from attnlab.mechanisms._engines.window_decode import Window, decode_softmax
from attnlab.registry import HParam, Limit, Paper, register_mechanism

__all__ = ["BigBirdAttention", "BlockSparseAttention", "DilatedWindowAttention",
           "LocalAttention", "LongformerAttention", "SlidingWindowAttention",
           "SparseTransformerAttention"]

PARMAR_2018 = Paper("Image Transformer",
                    "Niki Parmar, Ashish Vaswani, Jakob Uszkoreit, Lukasz Kaiser, Noam Shazeer, "
                    "Alexander Ku, Dustin Tran", 2018, "https://arxiv.org/abs/1802.05751")
BELTAGY_2020 = Paper("Longformer: The Long-Document Transformer",
                     "Iz Beltagy, Matthew E. Peters, Arman Cohan", 2020,
                     "https://arxiv.org/abs/2004.05150")
ZAHEER_2020 = Paper("Big Bird: Transformers for Longer Sequences",
                    "Manzil Zaheer, Guru Guruganesh, Avinava Dubey, Joshua Ainslie, Chris Alberti, "
                    "Santiago Ontanon, Philip Pham, Anirudh Ravula, Qifan Wang, Li Yang, "
                    "Amr Ahmed", 2020, "https://arxiv.org/abs/2007.14062")
CHILD_2019 = Paper("Generating Long Sequences with Sparse Transformers",
                   "Rewon Child, Scott Gray, Alec Radford, Ilya Sutskever", 2019,
                   "https://arxiv.org/abs/1904.10509")

_FLAGS = dict(family="sparse", exact=False, causal=True, arbitrary_mask=True, cross=False,
              returns_weights=False, half_precision=True)
_SOFTMAX = "out_i = softmax_{j in S_i}(q_i . k_j * scale + M_ij) v_j,  "
_BACKEND = HParam("backend", str, "auto", "auto (flex on CUDA, else blocked), blocked, flex",
                  choices=BACKENDS)


def _block(default: int) -> HParam:
    return HParam("block_size", int, default, "tokens per block b (N is padded to whole blocks)",
                  low=1)


_WINDOW = HParam("window", int, 128, "window w in tokens", low=1)
_GLOBALS = HParam("global_tokens", tuple, None, "indices of global tokens (negative count "
                  "from the end); None = (0,), the first token", nullable=True)
_TINY = dict(window=4, block_size=4)
# Limit cases (attnlab.verify): each pattern made to cover every pair, so the mechanism is
# softmax attention; the user's block_size and backend stay, so the blocked (or flex) path
# the benchmark runs is the one checked. A window w >= 2N covers |i - j| <= N - 1
# (bidirectional) and i - w < j (causal).
_FULL_WINDOW = Limit(hparams=lambda n: {"window": 2 * n},
                     note="window >= 2N: full attention")


def _bidirectional_band(w: int, d: int = 1) -> tuple[int, int, int]:
    return (-(w // 2) * d, (w // 2) * d, d)


class _GlobalTokensMixin:
    def _validated_globals(self) -> tuple[int, ...]:
        g = self.hp["global_tokens"]
        g = (0,) if g is None else g
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in g):
            raise TypeError(f"{self.spec.name}: hyperparameter 'global_tokens' must be a tuple "
                            f"of ints; got {self.hp['global_tokens']!r}")
        return g


@register_mechanism(
    "local", paper=PARMAR_2018, time="O(N b D)", memory="O(N (b + D))",
    equation=_SOFTMAX + "S_i = {j : floor(i/b) = floor(j/b)}",
    aliases=("block_local", "local_attention"), hparams=[_block(64), _BACKEND],
    tiny_hparams=dict(block_size=4),
    limit=Limit(hparams=lambda n: {"block_size": n}, note="block_size = N: full attention"),
    decode_state=True, **_FLAGS)
class LocalAttention(SparseMechanism):
    """Local (blocked) attention: each token attends only within its block of b tokens.

    ``S_i = {j : floor(i/b) = floor(j/b)}`` (Parmar et al. 2018's 1-D local attention with
    query and memory blocks equal, the "Local Attention" baseline of Long Range Arena).
    """

    def pattern(self, n, causal):
        b = self.hp["block_size"]
        return SparsePattern(n, b, causal, local=b)

    def _decode(self, q, k, v, state, scale):  # the current block's keys: span b
        b = self.hp["block_size"]
        win = Window(b, allowed=lambda i, j: i // b == j // b)
        return decode_softmax(self, q, k, v, state, scale, win)


@register_mechanism(
    "sliding_window", paper=BELTAGY_2020, time="O(N (w + b) D)", memory="O(N (w + b) (1 + D/b))",
    equation=_SOFTMAX + "S_i = {j : |i - j| <= w//2}; causal: {j : i - w < j <= i}",
    aliases=("swa",), hparams=[_WINDOW, _block(64), _BACKEND],
    tiny_hparams=_TINY, limit=_FULL_WINDOW, decode_state=True, **_FLAGS)
class SlidingWindowAttention(SparseMechanism):
    """Sliding-window attention: each token attends the w tokens around it.

    ``S_i = {j : |i - j| <= w//2}``; causal ``S_i = {j : i - w < j <= i}`` (the window
    of Beltagy et al. 2020, section 3.1). Causal ``w >= N`` is full causal attention;
    bidirectional, ``w >= 2(N - 1)`` is full attention.
    """

    def pattern(self, n, causal):
        w = self.hp["window"]
        band = (-(w - 1), 0, 1) if causal else _bidirectional_band(w)
        return SparsePattern(n, self.hp["block_size"], causal, band=band)

    def _decode(self, q, k, v, state, scale):  # i - w < j <= i
        return decode_softmax(self, q, k, v, state, scale, Window(self.hp["window"]))


@register_mechanism(
    "dilated_window", paper=BELTAGY_2020, time="O(N (w min(d, b) + b) D)",
    memory="O(N (w min(d, b) + b) (1 + D/b))",
    equation=_SOFTMAX + "S_i = {i + d t : |t| <= w//2}; causal: {i - d t : 0 <= t < w}",
    aliases=("dilated_sliding_window",),
    hparams=[_WINDOW, HParam("dilation", int, 2, "gap d between attended keys", low=1),
             _block(64), _BACKEND],
    tiny_hparams=dict(_TINY, dilation=2),
    limit=Limit(hparams=lambda n: {"window": 2 * n, "dilation": 1},
                note="dilation 1, window >= 2N: full attention"),
    decode_state=True, **_FLAGS)
class DilatedWindowAttention(SparseMechanism):
    """Dilated sliding window: w keys spaced d apart, ``S_i = {i + d t : |t| <= w//2}``.

    Beltagy et al. 2020, section 3.1 (causal: ``t`` in ``(-w, 0]``). At block granularity
    a query block touches the key blocks of its span that hold a key ``= i (mod d)``, so
    it scores ``O(w min(d, b) + b)`` keys per query; ``d = 1`` is ``sliding_window``.
    """

    def pattern(self, n, causal):
        w, d = self.hp["window"], self.hp["dilation"]
        band = (-(w - 1) * d, 0, d) if causal else _bidirectional_band(w, d)
        return SparsePattern(n, self.hp["block_size"], causal, band=band)

    def _decode(self, q, k, v, state, scale):  # j = i - d t, 0 <= t < w
        w, d = self.hp["window"], self.hp["dilation"]
        win = Window((w - 1) * d + 1, allowed=lambda i, j: (i - j) % d == 0)
        return decode_softmax(self, q, k, v, state, scale, win)


@register_mechanism(
    "longformer", paper=BELTAGY_2020, time="O(N (w + g b) D)", memory="O(N (w + g b) (1 + D/b))",
    equation=_SOFTMAX + "S_i = {j : |i - j| <= w//2} u {j : i in G or j in G}",
    hparams=[_WINDOW, _GLOBALS, _block(64), _BACKEND],
    tiny_hparams=_TINY,
    limit=Limit(hparams=lambda n: {"global_tokens": tuple(range(n))},
                note="every token global: full attention"),
    decode_state=True, **_FLAGS)
class LongformerAttention(_GlobalTokensMixin, SparseMechanism):
    """Longformer: a sliding window plus global tokens G that attend and are attended by all.

    ``S_i = {j : |i - j| <= w//2} u {j : i in G or j in G}`` (Beltagy et al. 2020, sec.
    3.1, one set of projections for both kinds of attention); causal: ``S_i n {j <= i}``.
    """

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self._validated_globals()

    def pattern(self, n, causal):
        g = self._check_globals(self._validated_globals(), n)
        return SparsePattern(n, self.hp["block_size"], causal,
                             band=_bidirectional_band(self.hp["window"]), global_tokens=g)

    def _decode(self, q, k, v, state, scale):
        """Window ``i - j <= w//2`` plus the global tokens, positions ``0 .. max(G)`` kept."""
        g = self._validated_globals()
        if any(t < 0 for t in g):
            raise ValueError(f"longformer.decode: global_tokens {g} count from the end, which "
                             f"moves as the sequence grows (its rows would need every key); "
                             f"decode with indices >= 0")
        G = torch.tensor(sorted(set(g)), dtype=torch.int64, device=q.device)
        half = self.hp["window"] // 2

        def allowed(i, j):
            return (i - j <= half) | torch.isin(i, G) | torch.isin(j, G)

        win = Window(half + 1, allowed, pinned=max(g, default=-1) + 1)
        return decode_softmax(self, q, k, v, state, scale, win)


@register_mechanism(
    "bigbird", paper=ZAHEER_2020, time="O(N (w + (g + r) b) D)",
    memory="O(N (w + (g + r) b) (1 + D/b))",
    equation=_SOFTMAX + "S_i = {j : |i-j| <= w//2} u {j : i in G or j in G} u "
    "{j : floor(j/b) in R(floor(i/b))}, |R| = r random blocks",
    aliases=("big_bird",),
    hparams=[_WINDOW, _GLOBALS,
             HParam("num_random_blocks", int, 3, "random key blocks r per query block", low=0),
             HParam("seed", int, 0, "seed of the random blocks", low=0), _block(64), _BACKEND],
    tiny_hparams=dict(_TINY, num_random_blocks=1),
    # The random blocks stay (drawn among uncovered blocks: none), the window too.
    limit=Limit(hparams=lambda n: {"global_tokens": tuple(range(n))},
                note="every token global: full attention"),
    **_FLAGS)
class BigBirdAttention(_GlobalTokensMixin, SparseMechanism):
    """BigBird: window + global tokens + r random key blocks per query block.

    ``S_i = {j : |i-j| <= w//2} u {j : i in G or j in G} u {j : floor(j/b) in R(I)}`` with
    ``R(I)`` r key blocks drawn uniformly, per query block ``I = floor(i/b)``, among those
    the window and global tokens do not already cover (all of them if fewer remain),
    from a generator seeded with ``seed`` (Zaheer et al. 2020, BIGBIRD-ITC with token-level
    window). Causal: ``S_i n {j <= i}`` (the same draw, intersected).
    """

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self._validated_globals()

    def _window_and_globals(self, n: int) -> SparsePattern:
        g = self._check_globals(self._validated_globals(), n)
        band = _bidirectional_band(self.hp["window"])
        return SparsePattern(n, self.hp["block_size"], False, band=band, global_tokens=g)

    def random_blocks(self, n: int) -> torch.Tensor:
        """``(nb, nb)`` bool: the random key blocks ``R(I)`` of each query block at length n."""
        covered = self._window_and_globals(n).block_layout()
        nb = covered.shape[0]
        r = min(self.hp["num_random_blocks"], nb)
        out = torch.zeros(nb, nb, dtype=torch.bool)
        if r:
            gen = torch.Generator().manual_seed(self.hp["seed"])
            scores = torch.rand(nb, nb, generator=gen).masked_fill(covered, -1.0)
            top = scores.topk(r, dim=1)
            out.scatter_(1, top.indices, top.values >= 0)  # a covered block is never drawn
        return out

    def pattern(self, n, causal):
        p = self._window_and_globals(n)
        key = ("bigbird", self.hp["seed"], self.hp["num_random_blocks"])
        return SparsePattern(n, p.block_size, causal, band=p.band, global_tokens=p.global_tokens,
                             blocks=self.random_blocks(n), key=key)


@register_mechanism(
    "sparse_transformer", paper=CHILD_2019,
    time="O(N (l + max(b, c) N/l) D), l = stride ~ sqrt(N) by default: O(N^1.5 max(b, c) D)",
    memory="O(N (l + max(b, c) N/l) (1 + D/b)); forward without autograd: O(N D)",
    equation=_SOFTMAX + "strided: S_i = {j : |i-j| <= l} u {j : (i-j) mod l = 0}; "
    "fixed: S_i = {j : floor(j/l) = floor(i/l)} u {j : j mod l >= l - c}",
    aliases=("sparse_factorized",),
    hparams=[HParam("pattern", str, "fixed", "factorised pattern", choices=("strided", "fixed")),
             HParam("stride", int, None, "stride l; None = scaled with N, as the paper's "
                    "l ~ sqrt(N): at each call, the multiple of block_size nearest sqrt(N), "
                    "at least block_size and c", low=1, nullable=True),
             HParam("c", int, 8, "summary width c of the fixed pattern (<= stride)", low=1),
             _block(16), _BACKEND],
    tiny_hparams=dict(stride=4, c=1, block_size=4),
    # Either pattern (the user's): strided |i - j| <= l, fixed floor(i/l) = floor(j/l) = 0.
    limit=Limit(hparams=lambda n: {"stride": n, "c": 1},
                note="stride l = N: one stride covers the sequence, full attention"),
    **_FLAGS)
class SparseTransformerAttention(SparseMechanism):
    """Sparse Transformer (Child et al. 2019): the union A(1) u A(2) of a factorised pattern.

    strided: ``A(1)_i = {j : |i - j| <= l}``, ``A(2)_i = {j : (i - j) mod l = 0}``;
    fixed: ``A(1)_i = {j : floor(j/l) = floor(i/l)}``, ``A(2)_i = {j : j mod l in
    {l-c, ..., l-1}}``. The paper's causal form (``t = max(0, i - l)`` .. ``i``) is the
    intersection with ``j <= i``; without ``is_causal`` the same sets are bidirectional.
    At block granularity A(2) touches about N/l key blocks, hence ``max(b, c) N/l``.

    The stride defaults to ``None``: ``l ~ sqrt(N)`` of the call's length, as the paper
    chooses it ("the stride l ... chosen to be close to sqrt(n)", sec. 4.3), rounded to a
    multiple of ``b`` so that its windows and summary columns fill whole blocks (at least
    ``b`` and ``c``; :meth:`stride_for`). Then ``K ~ (1 + max(b, c)) sqrt(N)`` keys per
    query and time is ``O(N^1.5 D)``; a fixed stride makes the ``N/l`` term, and the
    mechanism, quadratic in ``N``.
    """

    def __init__(self, **hparams):
        super().__init__(**hparams)
        l = self.hp["stride"]
        if self.hp["pattern"] == "fixed" and l is not None and self.hp["c"] > l:
            raise ValueError(f"sparse_transformer: hyperparameter 'c' must be <= stride="
                             f"{l}; got {self.hp['c']}")

    def stride_for(self, n: int) -> int:
        """The stride ``l`` at length ``n``: ``stride``, or the multiple of ``block_size``
        nearest ``sqrt(n)`` (at least ``block_size`` and ``c``) when it is ``None``."""
        if self.hp["stride"] is not None:
            return self.hp["stride"]
        b = self.hp["block_size"]
        return max(b * round(math.sqrt(n) / b), b, self.hp["c"])

    def pattern(self, n, causal):
        l, b = self.stride_for(n), self.hp["block_size"]
        if self.hp["pattern"] == "strided":
            return SparsePattern(n, b, causal, band=(-l, l, 1), stride=l)
        return SparsePattern(n, b, causal, local=l, summary=(l, self.hp["c"]))


@register_mechanism(
    "block_sparse", paper=CHILD_2019, time="O(nnz(A) b^2 D)", memory="O(nnz(A) b (b + D))",
    equation=_SOFTMAX + "S_i = {j : A[floor(i/b), floor(j/b)]}",
    aliases=("blocksparse",),
    hparams=[_block(64),
             HParam("layout", torch.Tensor, None, "(n_qblocks, n_kblocks) bool block layout A; "
                    "None = block diagonal", nullable=True), _BACKEND],
    tiny_hparams=dict(block_size=4),
    # An N x N layout of ones is full at any block_size (read from its top-left corner).
    limit=Limit(hparams=lambda n: {"layout": torch.ones(n, n, dtype=torch.bool)},
                note="layout of all ones: full attention"),
    **_FLAGS)
class BlockSparseAttention(SparseMechanism):
    """Block-sparse attention with any block layout A: ``S_i = {j : A[i//b, j//b]}``.

    ``attnlab.create("block_sparse", block_size=64, layout=A)`` or ``set_layout(A)``; ``A``
    is a 2-D bool tensor. A layout larger than needed is read from its top-left corner (a
    layout for ``max_seq_len`` serves shorter inputs); a smaller one is an error. Without
    a layout, A is the block diagonal (each block attends itself, as ``local``). The
    block-sparse kernels of Child et al. 2019 (OpenAI blocksparse) run such layouts.
    """

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.set_layout(self.hp["layout"])

    def set_layout(self, layout: torch.Tensor | None) -> None:
        """Replace the layout (``None``: block diagonal)."""
        if layout is not None:
            if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
                got = layout.dtype if isinstance(layout, torch.Tensor) else type(layout).__name__
                raise TypeError(f"block_sparse: layout must be a bool tensor (n_qblocks, "
                                f"n_kblocks); got {got}")
            if layout.dim() != 2:
                raise ValueError(f"block_sparse: layout must be 2-D (n_qblocks, n_kblocks); got "
                                 f"shape {tuple(layout.shape)}")
            layout = layout.detach().cpu().clone()
            digest = hashlib.blake2b(layout.numpy().tobytes(), digest_size=16).hexdigest()
            self._key = ("layout", tuple(layout.shape), digest)
        else:
            self._key = ("layout", None)
        self.hp["layout"] = layout

    def pattern(self, n, causal):
        b, layout = self.hp["block_size"], self.hp["layout"]
        nb = -(-n // b)
        if layout is None:
            return SparsePattern(n, b, causal, local=b)
        if layout.shape[0] < nb or layout.shape[1] < nb:
            raise ValueError(f"block_sparse: layout of shape {tuple(layout.shape)} is too small "
                             f"for N={n} at block_size={b}; expected at least ({nb}, {nb})")
        return SparsePattern(n, b, causal, blocks=layout[:nb, :nb], key=self._key)

    def extra_repr(self) -> str:
        lay = self.hp["layout"]
        shown = "None (block diagonal)" if lay is None else f"bool{tuple(lay.shape)}"
        return f"block_size={self.hp['block_size']}, layout={shown}, backend={self.hp['backend']!r}"
