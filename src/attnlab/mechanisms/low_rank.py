"""Low-rank attention: Linformer and Nyströmformer.

Both replace the ``(Nq, Nk)`` softmax matrix by a product of thin factors and never form
it: time and memory are linear in the sequence length for a fixed rank.

**Linformer** (Wang et al. 2020) projects keys and values *along the length* with learned
``k x n`` matrices ``E_i, F_i`` before a small softmax::

    head_i = softmax(Q_i (E_i K_i)^T / sqrt(d_k)) (F_i V_i)          P_bar: (Nq, k)

**Nyströmformer** (Xiong et al. 2021) picks ``m`` landmarks ``Q~, K~`` (means of ``m``
contiguous segments of ``Q`` and ``K``) and approximates ``S = softmax(Q K^T / sqrt(d))``
by the Nyström form::

    S^ V = softmax(Q K~^T / sqrt(d)) (softmax(Q~ K~^T / sqrt(d)))^+ softmax(Q~ K^T / sqrt(d)) V

with the Moore-Penrose inverse ``A^+`` of the ``m x m`` landmark kernel ``A`` computed by
the paper's iteration::

    Z_0 = A^T / (||A||_1 ||A||_inf),
    Z_{j+1} = 1/4 Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j)))

Neither has a causal form (mixing along the length lets every output see every key) and
neither can honour an arbitrary ``(Nq, Nk)`` mask (no ``(Nq, Nk)`` score exists to mask);
:class:`~attnlab.mechanisms.base.Mechanism` rejects both with a clear error.

Both take a **key-padding** mask (bool ``(B, H, 1, Nk)``, ``False`` = padded key): padded
keys and values are zeroed before they are mixed along the length, so the content of a
padded position never influences any output. They stay approximations with padding, and
not the same ones as on the unpadded sequence: the length projection and the landmark
segments are laid over all ``N`` positions, padded ones included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import nn

from attnlab.contract import masked_softmax, work_dtype
from attnlab.mechanisms.base import Mechanism, by_heads, key_padding_keep
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism

__all__ = ["Linformer", "Nystromformer", "iterative_pinv", "segment_means"]

WANG_2020 = Paper(
    "Linformer: Self-Attention with Linear Complexity",
    "Sinong Wang, Belinda Z. Li, Madian Khabsa, Han Fang, Hao Ma",
    2020,
    "https://arxiv.org/abs/2006.04768",
)
XIONG_2021 = Paper(
    "Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention",
    "Yunyang Xiong, Zhanpeng Zeng, Rudrasis Chakraborty, Mingxing Tan, Glenn Fung, "
    "Yin Li, Vikas Singh",
    2021,
    "https://arxiv.org/abs/2102.03902",
)
_NUM_HEADS = HParam("num_heads", int, None, "number of heads H (for per-head parameters)",
                    low=1, nullable=True)


# ----------------------------------------------------------------------------- Linformer
@register_mechanism(
    "linformer",
    family="low_rank",
    paper=WANG_2020,
    time="O(N k D)",
    memory="O(N k + k L)",
    equation="head_i = softmax(Q_i (E_i K_i)^T * scale) (F_i V_i),  E_i, F_i in R^{k x n} "
             "(first n columns of k x max_seq_len projections),  scale = 1/sqrt(d_k)",
    exact=False, causal=False, arbitrary_mask=False, key_padding=True, cross=True,
    returns_weights=False, learnable=True,
    hparams=[
        HParam("max_seq_len", int, REQUIRED, "longest key length n the projections cover",
               low=1),
        HParam("k", int, 256, "projected length k (rows of E and F)", low=1),
        HParam("sharing", str, "headwise",
               "paper's parameter sharing: none = E_i, F_i per head; headwise = one E, F for "
               "all heads; kv = E = F for all heads; layerwise = E = F shared across layers "
               "(pass shared_projection=)",
               choices=("none", "headwise", "kv", "layerwise")),
        HParam("init", str, "xavier",
               "xavier = fairseq reference (xavier_uniform, gain 1/sqrt 2); normal = N(0, 1/k) "
               "(the paper's JL projection); identity = E = F = I (needs k == max_seq_len)",
               choices=("xavier", "normal", "identity")),
        _NUM_HEADS,
    ],
    tiny_hparams={"k": 8},
    limit=Limit(hparams=lambda n: {"k": n, "max_seq_len": n, "init": "identity"},
                note="k = max_seq_len = N, E = F = I: softmax attention"),
)
class Linformer(Mechanism):
    """Linformer: keys and values projected along the length, softmax(Q (EK)^T)(FV).

    ``head_i = softmax(Q_i (E_i K_i)^T / sqrt(d_k)) (F_i V_i)`` with learned
    ``E_i, F_i`` of shape ``(k, max_seq_len)``. As in the authors' fairseq code, a key
    sequence of length ``n <= max_seq_len`` uses the first ``n`` columns ``E[:, :n]``;
    ``n > max_seq_len`` is an error. ``k > max_seq_len`` is allowed (an over-complete
    projection, then costlier than exact attention).

    Sharing follows the paper's Section 4: ``none`` keeps ``E_i, F_i`` per head (needs
    ``num_heads``); ``headwise`` one ``E, F`` for all heads (the default, as in fairseq);
    ``kv`` one ``E = F``; ``layerwise`` one ``E = F`` for every layer. Layerwise sharing
    lives in the model: build the first layer with ``sharing="layerwise"`` (it creates
    ``E``) and the others with ``shared_projection=first.E``, a constructor argument that
    is not a hyperparameter. A ``(Nq, Nk)`` mask has no meaning once keys are mixed, so
    arbitrary masks are refused; dropout applies to the ``(Nq, k)`` weights ``P_bar``.
    Cross-attention projects the keys' length ``Nk``; ``Nq`` is free.

    Key padding (the paper has none): padded keys and values are zeroed before the length
    projection, ``E (K * m)`` and ``F (V * m)``, so padding adds nothing to any of the ``k``
    mixed rows and its content never reaches the output. It is not masked softmax
    attention over the real keys, even with ``E = F = I``: a zeroed key still takes weight
    ``exp(0)`` with a zero value. A layer that folds the projection into its inputs
    (:meth:`length_projections`) zeroes the padded columns of ``E, F`` instead: the same.
    """

    def __init__(self, shared_projection: nn.Parameter | None = None, **hparams) -> None:
        super().__init__(**hparams)
        L, k, sharing, init = (self.hp[n] for n in ("max_seq_len", "k", "sharing", "init"))
        if init == "identity" and k != L:
            raise ValueError(f"linformer: init='identity' needs k == max_seq_len; "
                             f"got k={k}, max_seq_len={L}")
        if sharing == "none" and self.hp["num_heads"] is None:
            raise ValueError("linformer: sharing='none' keeps E_i, F_i per head and needs "
                             "num_heads (expected an int >= 1); got None")
        if shared_projection is not None:
            if sharing != "layerwise":
                raise ValueError(f"linformer: shared_projection is only used with "
                                 f"sharing='layerwise'; got sharing={sharing!r}")
            if not isinstance(shared_projection, nn.Parameter):
                raise TypeError(f"linformer: shared_projection must be an nn.Parameter; got "
                                f"{type(shared_projection).__name__}")
            if tuple(shared_projection.shape) != (k, L):
                raise ValueError(f"linformer: shared_projection must have shape (k, max_seq_len)"
                                 f" = ({k}, {L}); got {tuple(shared_projection.shape)}")
            self.E = shared_projection  # registered here too; parent modules deduplicate
            return
        shape = (self.hp["num_heads"], k, L) if sharing == "none" else (k, L)
        self.E = nn.Parameter(self._init(torch.empty(shape)))
        if sharing in ("none", "headwise"):
            self.F = nn.Parameter(self._init(torch.empty(shape)))

    def _init(self, w: torch.Tensor) -> torch.Tensor:
        init = self.hp["init"]
        if init == "identity":
            return w.copy_(torch.eye(w.shape[-1]).expand_as(w))
        if init == "normal":  # the paper's Johnson-Lindenstrauss projection, N(0, 1/k)
            return nn.init.normal_(w, std=1.0 / math.sqrt(self.hp["k"]))
        # fairseq's reference init of compress_k / compress_v, per (k, L) matrix
        for m in w.view(-1, *w.shape[-2:]):
            nn.init.xavier_uniform_(m, gain=1.0 / math.sqrt(2.0))
        return w

    def _projections(self, n: int):
        L = self.hp["max_seq_len"]
        if n > L:
            raise ValueError(f"linformer: key length N={n} exceeds max_seq_len={L} (E and F "
                             f"are (k, max_seq_len)); build it with max_seq_len >= {n}")
        E = self.E[..., :n]
        return E, (self.F[..., :n] if hasattr(self, "F") else E)

    def length_projections(self, n: int):
        """``(E, F)`` of shape ``(k, n)`` when one pair serves every head, else ``None``.

        The :meth:`~attnlab.Mechanism.length_projections` hook: mixing along the length
        commutes with a layer's feature projection, ``E (X W) = (E X) W``, so a layer may
        mix its inputs first (``k`` rows instead of ``n``; :class:`attnlab.nn.MultiheadAttention`
        does when that is cheaper, :mod:`attnlab.nn.length_fold`) and then call
        :meth:`attend_projected`. Per-head projections (``sharing="none"``) cannot fold.
        """
        return None if self.E.dim() == 3 else self._projections(n)

    def attend_projected(self, q, k_bar, v_bar, scale: float | None = None,
                         dropout_p: float = 0.0):
        """``softmax(Q K_bar^T * scale) V_bar`` for keys and values already projected to
        ``(B, H, k, D)``: the second half of the forward pass. Half-precision inputs are
        computed in float32 (a float16 ``q . k_bar`` overflows past 65504) and the result
        returned in ``q``'s dtype."""
        scale = self.default_scale(q.shape[-1]) if scale is None else scale
        dtype, work = q.dtype, work_dtype(q.dtype)
        q, k_bar, v_bar = q.to(work), k_bar.to(work), v_bar.to(work)
        scores = torch.matmul(q * scale, k_bar.transpose(-2, -1))        # (B, H, Nq, k)
        p_bar = torch.softmax(scores, dim=-1)
        if dropout_p > 0:
            p_bar = nnf.dropout(p_bar, dropout_p)
        return torch.matmul(p_bar, v_bar).to(dtype)

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        E, F = self._projections(k.shape[-2])
        per_head = E.dim() == 3
        if per_head and q.shape[1] != E.shape[0]:
            raise ValueError(f"linformer: sharing='none' was built for num_heads="
                             f"{E.shape[0]}; got H={q.shape[1]}")

        # A few heads at a time: one slice's (Nq, k) scores and weights, not all H heads',
        # set the peak (k = 256 at 16K tokens and 8 heads: 256 MiB of them).
        def heads(q, k, v, mask, s):
            Es, Fs = (E[s], F[s]) if per_head else (E, F)
            return self._attend_heads(q, k, v, mask, Es, Fs, scale, dropout_p)

        return by_heads(heads, q, k, v, attn_mask, q.shape[2] * self.hp["k"]), None

    def _attend_heads(self, q, k, v, attn_mask, E, F, scale, dropout_p):
        keep = key_padding_keep(attn_mask, *k.shape[:3])
        if keep is not None:
            k, v = (t.masked_fill(~keep.unsqueeze(-1), 0.0) for t in (k, v))
        per_head = E.dim() == 3
        # einsum lets the shared projection fold into one matmul (no (B, H, k, n) copy).
        # Mixed in float32 for half inputs: a sum of n keys can leave float16's range.
        eq = "hkn,bhnd->bhkd" if per_head else "kn,bhnd->bhkd"
        work = work_dtype(q.dtype)
        k_bar = torch.einsum(eq, E.to(work), k.to(work))                 # (B, H, k, D)
        v_bar = torch.einsum(eq, F.to(work), v.to(work))
        out = self.attend_projected(q.to(work), k_bar, v_bar, scale, dropout_p)
        return out.to(q.dtype)


# ------------------------------------------------------------------------- Nyströmformer
def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of ``m`` contiguous segments of ``x`` along dim -2: ``(..., n, d) -> (..., m, d)``.

    Token ``j`` belongs to segment ``floor(j m / n)``: segments hold ``floor(n/m)`` or
    ``ceil(n/m)`` tokens and none is empty when ``m <= n``. When ``m`` divides ``n`` this is
    exactly the paper's segment means (the reference code's reshape-and-mean).
    """
    n = x.shape[-2]
    if n % m == 0:
        return x.unflatten(-2, (m, n // m)).mean(-2)
    seg = torch.arange(n, device=x.device) * m // n
    sums = x.new_zeros(*x.shape[:-2], m, x.shape[-1]).index_add(-2, seg, x)
    counts = torch.bincount(seg, minlength=m).to(x.dtype)
    return sums / counts[:, None]


def iterative_pinv(A: torch.Tensor, iterations: int) -> torch.Tensor:
    """The paper's iterative Moore-Penrose inverse of each ``(m, m)`` matrix in ``A``.

    ``Z_0 = A^T / (||A||_1 ||A||_inf)`` per matrix (max column sum times max row sum;
    it makes ``||I - A Z_0|| < 1``) and then third-order updates
    ``Z <- 1/4 Z (13 I - AZ (15 I - AZ (7 I - AZ)))``. Convergence needs about
    ``log(cond(A)^2) / log(3.25)`` steps; the paper's 6 suffice for well-conditioned kernels.
    For a singular ``A`` it tends to ``A^+``, but rounding noise in the null space grows
    3.25x per step, so far more steps than convergence needs eventually blow up.
    """
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    norm_1 = A.abs().sum(-2).amax(-1)
    norm_inf = A.abs().sum(-1).amax(-1)
    Z = A.transpose(-2, -1) / (norm_1 * norm_inf)[..., None, None]
    for _ in range(iterations):
        AZ = A @ Z
        Z = 0.25 * Z @ (13 * eye - AZ @ (15 * eye - AZ @ (7 * eye - AZ)))
    return Z


@register_mechanism(
    "nystromformer",
    family="low_rank",
    paper=XIONG_2021,
    time="O(N m D + N m^2 + T m^3)",
    memory="O(N m + m^2)",
    equation="softmax(Q K~^T * scale) (softmax(Q~ K~^T * scale))^+ softmax(Q~ K^T * scale) V"
             "  [+ DConv(V)],  Q~, K~ = segment means (m landmarks), ^+ = iterative "
             "Moore-Penrose (T steps),  scale = 1/sqrt(d)",
    exact=False, causal=False, arbitrary_mask=False, key_padding=True, cross=True,
    returns_weights=False, aliases=("nystrom",),
    hparams=[
        HParam("num_landmarks", int, 32, "landmarks m (segment means of Q and K); must be "
               "<= the sequence length", low=1),
        HParam("pinv", str, "iterative", "iterative = the paper's iteration; exact = "
               "torch.linalg.pinv", choices=("iterative", "exact")),
        HParam("pinv_iterations", int, 6, "iterations T of the iterative pinv", low=1),
        HParam("conv_kernel", int, None, "odd kernel of the depthwise conv residual on V "
               "(None = off; on, the module is learnable and needs num_heads)", low=1,
               nullable=True),
        _NUM_HEADS,
    ],
    tiny_hparams={"num_landmarks": 4},
    # m = N: S S^+ S V = S V, but computed to about eps * cond(S) (see the class docstring);
    # cond(S) reaches 1e4..5e5 on random inputs at N = 256..512. Measured float32 errors:
    # <= 1.2e-4 (D >= 4, N <= 512), hence 1e-3. At head_dim <= 4, S = softmax(QK^T) of a
    # rank-D QK^T is numerically rank-deficient and float64 misses its 1e-9 (D=4, N=512).
    limit=Limit(hparams=lambda n: {"num_landmarks": n, "pinv": "exact", "conv_kernel": None},
                note="num_landmarks = N (one per token), exact pinv, no conv: softmax attention",
                tol=1e-3),
)
class Nystromformer(Mechanism):
    """Nyströmformer: Nyström approximation of softmax attention through m landmarks.

    ``S^ V = softmax(Q K~^T/sqrt(d)) (softmax(Q~ K~^T/sqrt(d)))^+ softmax(Q~ K^T/sqrt(d)) V``
    where ``Q~, K~`` are the means of ``m`` contiguous segments of ``Q`` and ``K``. The
    product is taken right to left, ``F1 (Z (F3 V))``, which equals the reference
    code's ``(F1 Z)(F3 V)`` at ``O(N m D)`` instead of ``O(N m^2)``.

    Lengths not divisible by ``m``: the reference code needs ``m | N``; lucidrains'
    port left-pads to a multiple of ``m`` and takes masked means, which can leave whole
    segments empty (N=17, m=16: segments of 2 over 32 slots). Here segments have
    ``floor(N/m)`` or ``ceil(N/m)`` tokens (:func:`segment_means`): never empty, no mask,
    and the paper's means whenever ``m | N``. ``m`` must be ``<= min(Nq, Nk)``.

    With ``m = N`` every landmark is one token and ``S^ = S S^+ S = S``: exact attention,
    up to the accuracy of the inverse (``pinv="exact"`` uses ``torch.linalg.pinv``;
    the iteration needs enough steps for the kernel's conditioning). Half-precision
    inputs are computed in float32. Dropout (not in the paper) drops entries of the
    ``(Nq, m)`` factor ``softmax(Q K~^T)``; rescaled, it keeps ``S^`` unbiased.

    ``conv_kernel`` adds the paper's depthwise convolution of ``V`` over the sequence
    (one ``(conv_kernel, 1)`` filter per head; needs ``num_heads`` and ``Nq == Nk``). It
    is off by default; the registry's ``learnable=False`` describes that default.

    Key padding, as the authors' reference code: padded keys (and, when ``Nq == Nk``, the
    queries at the same positions: self-attention padding) are zeroed before the landmark
    means, padded keys are masked out of ``softmax(Q~ K^T)`` (the only factor that meets
    ``V``) and padded values are zeroed (also before the convolution). Padding content
    never reaches the output; with ``m = N`` and the exact pinv the real rows are masked
    softmax attention, otherwise the landmarks (segments over all ``N`` positions) differ
    from those of the unpadded sequence.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        kernel, heads = self.hp["conv_kernel"], self.hp["num_heads"]
        self.conv = None
        if kernel is not None:
            if kernel % 2 == 0:
                raise ValueError(f"nystromformer: conv_kernel must be odd (the residual keeps "
                                 f"the length N with padding conv_kernel // 2); got {kernel}")
            if heads is None:
                raise ValueError("nystromformer: conv_kernel needs num_heads (one filter per "
                                 "head; expected an int >= 1); got None")
            self.conv = nn.Conv2d(heads, heads, (kernel, 1), padding=(kernel // 2, 0),
                                  groups=heads, bias=False)

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        nq, nk, m = q.shape[-2], k.shape[-2], self.hp["num_landmarks"]
        if m > min(nq, nk):
            where = f"N={nq}" if nq == nk else f"min(Nq, Nk)={min(nq, nk)} (Nq={nq}, Nk={nk})"
            raise ValueError(f"nystromformer: num_landmarks={m} must be <= {where}")
        if self.conv is not None:
            self._check_conv(q, k)
        dtype = q.dtype
        work = work_dtype(dtype)  # the inverse needs >= float32
        q, k, v = q.to(work), k.to(work), v.to(work)
        keep = key_padding_keep(attn_mask, *k.shape[:3])
        if keep is not None:  # the reference code's Q * mask, K * mask (and V before conv)
            pad = ~keep.unsqueeze(-1)
            k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
            if nq == nk:
                q = q.masked_fill(pad, 0.0)
        q_l, k_l = segment_means(q, m), segment_means(k, m)                   # (B, H, m, D)
        f1 = torch.softmax(torch.matmul(q, k_l.transpose(-2, -1)) * scale, -1)    # (Nq, m)
        a = torch.softmax(torch.matmul(q_l, k_l.transpose(-2, -1)) * scale, -1)   # (m, m)
        f3 = torch.matmul(q_l, k.transpose(-2, -1)) * scale                       # (m, Nk)
        f3 = torch.softmax(f3, -1) if keep is None else masked_softmax(f3, keep.unsqueeze(-2))
        if self.hp["pinv"] == "exact":
            z = torch.linalg.pinv(a)
        else:
            z = iterative_pinv(a, self.hp["pinv_iterations"])
        if dropout_p > 0:
            f1 = nnf.dropout(f1, dropout_p)
        out = torch.matmul(f1, torch.matmul(z, torch.matmul(f3, v)))
        if self.conv is not None:
            out = out + nnf.conv2d(v, self.conv.weight.to(work), padding=self.conv.padding,
                                   groups=self.conv.groups)
        return out.to(dtype), None

    def _check_conv(self, q, k) -> None:
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(f"nystromformer: conv_kernel adds a convolution of V to each "
                             f"query and needs Nq == Nk; got Nq={q.shape[-2]}, Nk={k.shape[-2]}")
        if q.shape[1] != self.hp["num_heads"]:
            raise ValueError(f"nystromformer: conv_kernel was built for num_heads="
                             f"{self.hp['num_heads']}; got H={q.shape[1]}")
