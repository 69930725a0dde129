"""PyPI peer implementations as benchmark mechanisms: ``attnlab bench --mechanisms peer:NAME``.

Only *kernel-level* peers are here, the ones that take ``(B, H, N, D)`` ``q, k, v`` as
attnlab's mechanisms do, so that one sweep times them side by side on the same inputs:

* ``performer_pytorch``: ``performer_pytorch.FastAttention`` (FAVOR+, ``nb_features``
  positive orthogonal random features, default 256; causal via its prefix-sum path);
* ``local_attention``: ``local_attention.LocalAttention`` (windows of ``window_size``
  tokens that see ``look_backward`` windows back and ``look_forward`` ahead, no rotary
  embedding, ``autopad=True``). ``look_forward`` is 0 when causal (the peer refuses more,
  and keys ahead would all be masked anyway). Its autopad does *not* mask the zero keys it
  pads with (they get score 0 and share the softmax), so when ``window_size`` does not
  divide ``N`` the key-padding mask it accepts is passed, all True over the real tokens;
* ``reformer_pytorch``: ``reformer_pytorch.LSHAttention`` (``bucket_size`` 64, ``n_hashes``
  2, ``attend_across_buckets=False``: a key must share its query's bucket, the paper's
  eq. 3, as in ``benchmarks/peers.toml``). It takes ``qk`` and ``v`` of shape ``(B*H, N, D)``:
  **shared QK, the ``k`` given is ignored** (keys are the normalised queries, and a query
  attends itself only when nothing else is allowed), so its ``error`` column, measured
  against exact attention with the given ``k``, compares different functions. ``N`` must
  be a multiple of ``2 * bucket_size``.

The layer-level peers (``linformer.LinformerSelfAttention``,
``nystrom_attention.NystromAttention``) take ``x (B, N, E)`` and own their projections, not
``q, k, v``: they are not mechanisms and stay out of the harness (their layer-level
figures in docs/benchmarks.md were measured with a script since removed).

Every peer has a correctness gate like attnlab's own mechanisms (:func:`verify_peer`, the
semantics of :func:`attnlab.verify.verify`), a :class:`~attnlab.registry.Limit` at which it
computes a known dense function, checked in float64 (max-norm relative error):

* ``local_attention``: ``window_size = ceil(n/2)``, one window back and one ahead (none
  when causal): two windows that see each other, i.e. softmax attention (odd ``n`` also
  checks the padding mask). tol 1e-4 (float32).
* ``reformer_pytorch``: ``bucket_size = n/2``, ``n_hashes = 1``,
  ``attend_across_buckets=True``: two chunks, each sees itself and the other
  (``look_one_back`` wraps around), i.e. shared-QK softmax attention ``softmax(q k^T /
  sqrt(D)) V``, ``k = q/|q|``, diagonal masked unless alone. tol 1e-4. One round: with
  more, the rounds' sorted sequences are concatenated and a round's first chunk looks back
  into the previous round's last one, so no setting makes several rounds exact.
* ``performer_pytorch``: any ``nb_features`` (the benchmark's are the ones checked): the
  FAVOR+ estimator of the paper with the peer's own random features ``W`` (its buffer
  ``projection_matrix``), ``phi(x) = exp(W x' - |x'|^2/2)/sqrt(m)``, ``x' = x D^(-1/4)``,
  ``out = D^-1 phi(Q) phi(K)^T V`` (eq. 6; lower-triangular when causal), computed densely.
  Not a Monte Carlo comparison with softmax: that needs ~16K features for 5 % (attnlab's
  own ``performer`` limit), and the peer draws them with one small QR per ``D`` rows and runs
  its causal form in 128 sequential chunks, tens of seconds per gate. The peer adds
  ``eps = 1e-4`` to every feature after subtracting a max (a floor, not in the paper);
  on the inputs of attnlab's performer limit (``|x'| <= 0.8``, where the features are
  far above that floor) it moves the output by up to 1.5e-3 (m <= 1024), 3.1e-3 (m = 4096)
  and 2.3e-3 (m = 16384, non-causal), measured over D = 8..128, n = 1..256, both forms, so
  tol is 1e-2, and it stays 1e-2 in float64 (a bias, not rounding: ``Limit.statistical``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnlab.mechanisms.kernel import performer_limit_inputs
from attnlab.registry import HParam, Limit
from attnlab.registry import validate_hparams as registry_validate
from attnlab.util.checks import did_you_mean
from attnlab.verify import (
    VerifyResult,
    causal_allowed,
    check_sizes,
    dense_softmax_f64,
    judge,
    naive_attention_f64,
    param_f64,
    tolerance,
)

__all__ = ["PEERS", "PREFIX", "PeerAttention", "PeerSpec", "available", "build", "is_peer",
           "list_peers", "resolve", "unsupported", "validate_hparams", "verify_peer"]

PREFIX = "peer:"
PIP_HINT = "pip install 'attnlab[peers]'"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}
_TINY = 1e-30


@dataclass(frozen=True)
class PeerSpec:
    """One kernel-level peer: how to import, build, call and check it."""

    name: str  # the key in PEERS: the import name, e.g. "local_attention"
    module: str  # what to import (and to look for with find_spec)
    pip: str  # its PyPI name
    cls: str  # the class used, for people
    hparams: tuple[HParam, ...]
    # (hparams, N, D, H, device, dtype, seed) -> PeerAttention; hparams validated, complete
    build: Callable[..., PeerAttention]
    limit: Limit  # the gate: limit.hparams(n) override, limit.reference in float64
    causal: bool = True
    differentiable: bool = True
    dtypes: tuple[str, ...] = tuple(_DTYPES)
    check: Callable[[int, dict], str | None] | None = None  # N-dependent "cannot run" reason

    @property
    def label(self) -> str:
        return PREFIX + self.name


class PeerAttention(torch.nn.Module):
    """A peer behind attnlab's call, ``forward(q, k, v, is_causal=False) -> (B, H, N, D)``.

    ``full`` and ``causal`` are the peer modules for each case (the peers fix causality at
    construction); ``run(module, q, k, v, is_causal)`` adapts shapes and arguments.
    """

    def __init__(self, name: str, full: torch.nn.Module, causal: torch.nn.Module | None,
                 run: Callable) -> None:
        super().__init__()
        self.name = name
        self.full, self.causal = full, causal
        self._run = run

    def forward(self, q, k, v, is_causal: bool = False):
        if is_causal and self.causal is None:
            raise ValueError(f"{PREFIX}{self.name}: has no causal form; got is_causal=True")
        return self._run(self.causal if is_causal else self.full, q, k, v, is_causal)


@contextlib.contextmanager
def _quiet_setup(seed: int):
    """Peer construction: seeded without touching the caller's RNG, silent (performer prints
    when it falls back to its non-CUDA causal path; its import warns about distutils), and
    single-threaded: performer draws its features with one tiny QR per D rows, and a 16x16
    QR costs ~16 ms with 2 OpenMP threads on a busy machine, 8 us with one."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _import(spec: PeerSpec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # performer_pytorch: distutils, torch.cuda.amp
        return importlib.import_module(spec.module)


# --------------------------------------------------------------------- performer_pytorch
def _build_performer(hp, n, d, h, device, dtype, seed):
    mod = _import(PEERS["performer_pytorch"])
    with _quiet_setup(seed):
        full = mod.FastAttention(dim_heads=d, nb_features=hp["nb_features"])
        causal = mod.FastAttention(dim_heads=d, nb_features=hp["nb_features"], causal=True)
        causal.projection_matrix.copy_(full.projection_matrix)  # one draw for both forms
    return PeerAttention("performer_pytorch", full, causal,
                         lambda m, q, k, v, c: m(q, k, v)).to(device=device, dtype=dtype).eval()


def favor_reference(q, k, v, *, mech, scale, is_causal):
    """FAVOR+ (Choromanski et al. 2021, Lemma 1 and eq. 6) with the peer's own features,
    densely in float64: ``A = phi(Q) phi(K)^T`` (lower triangle when causal), ``out = A V /
    A 1``. The per-row / global maxima subtracted below cancel exactly in the ratio."""
    w = param_f64(mech.full.projection_matrix)  # (m, D)
    d = q.shape[-1]

    def log_phi(x):
        x = x * d ** -0.25
        return x @ w.T - (x * x).sum(-1, keepdim=True) / 2  # - log sqrt(m) cancels too

    lq, lk = log_phi(q), log_phi(k)
    fq = torch.exp(lq - lq.amax(-1, keepdim=True))
    fk = torch.exp(lk - lk.amax((-2, -1), keepdim=True))
    a = fq @ fk.transpose(-2, -1)
    if is_causal:
        a = a * causal_allowed(q.shape[-2], k.shape[-2])
    return (a @ v) / a.sum(-1, keepdim=True)


def _performer_inputs(q, k, v, gen):

    return performer_limit_inputs(q, k, v, gen)


# ----------------------------------------------------------------------- local_attention
def _build_local(hp, n, d, h, device, dtype, seed):
    mod = _import(PEERS["local_attention"])
    kw = dict(window_size=hp["window_size"], look_backward=hp["look_backward"],
              use_rotary_pos_emb=False, autopad=True)
    with _quiet_setup(seed):
        full = mod.LocalAttention(causal=False, look_forward=hp["look_forward"], **kw)
        causal = mod.LocalAttention(causal=True, look_forward=0, **kw)
    window = hp["window_size"]

    def run(m, q, k, v, is_causal):
        if q.shape[-2] % window:  # autopad adds zero keys it does not mask: mask them
            ones = torch.ones(1, q.shape[-2], dtype=torch.bool, device=q.device)
            return m(q, k, v, mask=ones)
        return m(q, k, v)

    return PeerAttention("local_attention", full, causal, run).to(device=device).eval()


def _local_limit(n: int) -> dict:
    return {"window_size": max(1, math.ceil(n / 2)), "look_backward": 1, "look_forward": 1}


# ---------------------------------------------------------------------- reformer_pytorch
def _build_reformer(hp, n, d, h, device, dtype, seed):
    mod = _import(PEERS["reformer_pytorch"])
    kw = dict(bucket_size=hp["bucket_size"], n_hashes=hp["n_hashes"],
              attend_across_buckets=hp["attend_across_buckets"])
    with _quiet_setup(seed):
        full = mod.LSHAttention(causal=False, **kw)
        causal = mod.LSHAttention(causal=True, **kw)

    def run(m, q, k, v, is_causal):  # shared QK: k is ignored (see the module docstring)
        b, heads, length, dim = q.shape
        out = m(q.reshape(b * heads, length, dim), v.reshape(b * heads, length, v.shape[-1]))[0]
        return out.reshape(b, heads, length, v.shape[-1])

    return PeerAttention("reformer_pytorch", full, causal, run).to(device=device).eval()


def lsh_reference(q, k, v, *, mech, scale, is_causal):
    """Shared-QK softmax attention in float64, what LSH attention is when every query sees
    every key: keys ``q_j / |q_j|`` (``k`` ignored), scale ``1/sqrt(D)``, self masked unless
    no other key is allowed (the peer's rule, the paper's)."""
    n = q.shape[-2]
    keys = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    scores = q @ keys.transpose(-2, -1) * q.shape[-1] ** -0.5
    allowed = causal_allowed(n, n) if is_causal else torch.ones(n, n, dtype=torch.bool)
    eye = torch.eye(n, dtype=torch.bool)
    others = allowed & ~eye
    return dense_softmax_f64(scores, v, others | (eye & ~others.any(-1, keepdim=True)))


def _reformer_check(n: int, hp: dict) -> str | None:
    if n % (2 * hp["bucket_size"]):
        return (f"{PREFIX}reformer_pytorch needs N divisible by 2 * bucket_size = "
                f"{2 * hp['bucket_size']}; got N={n}")
    return None


# ---------------------------------------------------------------------------- the table
PEERS: dict[str, PeerSpec] = {
    "performer_pytorch": PeerSpec(
        "performer_pytorch", "performer_pytorch", "performer-pytorch", "FastAttention",
        (HParam("nb_features", int, 256, "random features m", low=1),),
        _build_performer,
        Limit(hparams=lambda n: {}, reference=favor_reference, inputs=_performer_inputs,
              tol=1e-2, statistical=True,
              note="FAVOR+ with its own features, dense in float64 (tol: its eps=1e-4 floor)"),
        dtypes=("float32", "float64", "bfloat16")),  # float16: its exp features overflow
    "local_attention": PeerSpec(
        "local_attention", "local_attention", "local-attention", "LocalAttention",
        (HParam("window_size", int, 256, "tokens per window", low=1),
         HParam("look_backward", int, 1, "windows seen back", low=0),
         HParam("look_forward", int, 1, "windows seen ahead (0 when causal)", low=0)),
        _build_local,
        Limit(hparams=_local_limit, note="window = ceil(N/2), one back and ahead: softmax")),
    "reformer_pytorch": PeerSpec(
        "reformer_pytorch", "reformer_pytorch", "reformer-pytorch", "LSHAttention",
        (HParam("bucket_size", int, 64, "tokens per chunk; N % (2 bucket_size) == 0", low=1),
         HParam("n_hashes", int, 2, "hash rounds", low=1),
         HParam("attend_across_buckets", bool, False, "see other buckets in the chunk")),
        _build_reformer,
        Limit(hparams=lambda n: {"bucket_size": max(1, n // 2), "n_hashes": 1,
                                 "attend_across_buckets": True},
              reference=lsh_reference,
              note="bucket = N/2, 1 hash, across buckets: 2 chunks see all: shared-QK softmax"),
        check=_reformer_check),
}


# Whole layers that own their projections: not mechanisms, refused with the reason.
LAYER_LEVEL = {"linformer": "linformer.LinformerSelfAttention",
               "nystrom_attention": "nystrom_attention.NystromAttention"}


# ---------------------------------------------------------------------------- lookups
def is_peer(mechanism: str) -> bool:
    return isinstance(mechanism, str) and mechanism.startswith(PREFIX)


def resolve(name: str) -> PeerSpec:
    """The spec for ``name`` (``peer:NAME`` or ``NAME``, case and ``-``/``_`` folded);
    ``ValueError`` with close matches if unknown."""
    if not isinstance(name, str):
        raise TypeError(f"peer: name must be a str; got {type(name).__name__} {name!r}")
    bare = name[len(PREFIX):] if name.startswith(PREFIX) else name
    key = bare.strip().lower().replace("-", "_")
    if key in PEERS:
        return PEERS[key]
    if key in LAYER_LEVEL:
        raise ValueError(f"peer: {name!r} is a layer-level peer ({LAYER_LEVEL[key]} takes x "
                         f"(B, N, E), not q, k, v): not a mechanism; attnlab bench times "
                         f"the kernel-level peers only: {', '.join(PEERS)}")
    labels = [s.label for s in PEERS.values()]
    hint = did_you_mean(PREFIX + key, labels, n=2, cutoff=0.6)
    raise ValueError(f"peer: unknown name {name!r}{hint} (known: {', '.join(labels)})")


def available(name: str) -> bool:
    """Whether the peer's package can be imported (without importing it)."""
    return importlib.util.find_spec(resolve(name).module) is not None


def list_peers(installed: bool | None = None) -> list[str]:
    """Names in :data:`PEERS`; ``installed=True``/``False`` keeps those that are / are not."""
    return [n for n in PEERS if installed is None or available(n) == installed]


def validate_hparams(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """All of the peer's hyperparameters: ``given`` checked (unknown names with close
    matches: ``TypeError``; bad values: ``TypeError``/``ValueError``) over the defaults."""
    spec = resolve(name)
    return registry_validate(spec.label, spec.hparams, given)


def unsupported(name: str, *, n: int, hparams: dict, causal: bool, pass_: str,
                dtype: str) -> str | None:
    """Why the peer cannot run this point at all (``None``: it can); the harness stores
    such points as ``unsupported`` and goes on."""
    spec = resolve(name)
    if not available(spec.name):
        return f"{spec.label}: {spec.module} is not installed: {PIP_HINT}"
    if causal and not spec.causal:
        return f"{spec.label} has no causal form"
    if pass_ == "fwd+bwd" and not spec.differentiable:
        return f"{spec.label} has no backward"
    if dtype not in spec.dtypes:
        return f"{spec.label} does not take {dtype}"
    return spec.check(n, validate_hparams(name, hparams)) if spec.check else None


def build(name: str, hparams: dict | None = None, *, n: int, head_dim: int, num_heads: int,
          device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> PeerAttention:
    """The peer as a :class:`PeerAttention` on ``device``/``dtype``, hyperparameters
    validated over its defaults; random draws seeded by ``seed`` (the caller's RNG kept)."""
    spec = resolve(name)
    if not available(spec.name):
        raise ModuleNotFoundError(f"{spec.label}: {spec.module} is not installed: {PIP_HINT}")
    hp = validate_hparams(name, dict(hparams or {}))
    return spec.build(hp, n, head_dim, num_heads, device, dtype, seed)


# ---------------------------------------------------------------------------- the gate
def verify_peer(name: str, *, n: int = 64, head_dim: int = 16, num_heads: int = 2,
                batch: int = 2, dtype: torch.dtype = torch.float32, causal: bool = False,
                device="cpu", seed: int = 0, **hparams) -> VerifyResult:
    """:func:`attnlab.verify.verify` for a peer: build it with ``hparams`` and the limit's
    overrides on top, run it on seeded ``(batch, num_heads, n, head_dim)`` inputs and
    compare with the limit's float64 reference (max-norm relative error, the same
    tolerances per dtype).

    Bad arguments raise (unknown peer or hyperparameter, a dtype it does not take, ``n``
    its limit cannot use). Anything that goes wrong in the peer, including not being
    installed, gives ``ok=False`` with the reason in ``message``.
    """
    spec = resolve(name)
    limit = spec.limit
    check_sizes("verify_peer", n=n, head_dim=head_dim, num_heads=num_heads, batch=batch)
    names = {v: k for k, v in _DTYPES.items()}
    if dtype not in names:
        raise TypeError(f"verify_peer: dtype must be one of {list(_DTYPES)}; got {dtype!r}")
    if names[dtype] not in spec.dtypes:
        raise TypeError(f"verify_peer: {spec.label} does not take {names[dtype]}; it takes "
                        f"{', '.join(spec.dtypes)}")
    if not isinstance(causal, bool):
        raise TypeError(f"verify_peer: causal must be a bool; got {type(causal).__name__}")
    if causal and not spec.causal:
        raise ValueError(f"verify_peer: {spec.label} has no causal form")
    hp = validate_hparams(name, {**hparams, **limit.hparams(n)})
    why = spec.check(n, hp) if spec.check else None
    if why:
        raise ValueError(f"verify_peer: n={n} cannot be used: {why}")
    tol = tolerance(limit, dtype)

    def result(ok: bool, error: float, message: str) -> VerifyResult:
        return VerifyResult(spec.label, ok, error, tol, limit.note, message)

    if not available(spec.name):
        return result(False, math.inf, f"{spec.module} is not installed: {PIP_HINT}")
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, num_heads, n, head_dim, generator=gen, dtype=torch.float64)
               for _ in range(3))
    if limit.inputs is not None:
        q, k, v = limit.inputs(q, k, v, gen)
    q, k, v = (t.to(dtype) for t in (q, k, v))  # the reference gets these values exactly
    try:
        mech = build(spec.name, hp, n=n, head_dim=head_dim, num_heads=num_heads,
                     device=device, dtype=dtype, seed=seed)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)  # LSH draws its rotations at every call
            out = mech(q.to(device), k.to(device), v.to(device), is_causal=causal)
        ref = (limit.reference or _softmax_reference)(
            q.double(), k.double(), v.double(), mech=mech, scale=None, is_causal=causal)
    except Exception as e:  # noqa: BLE001  (the gate reports, it never crashes the harness)
        return result(False, math.inf, f"raised {type(e).__name__}: {e}")
    return result(*judge(out, ref, dtype, tol))


def _softmax_reference(q, k, v, *, mech, scale, is_causal):

    return naive_attention_f64(q, k, v, is_causal=is_causal)
