"""The bad-input audit: every mechanism, every way a caller can get an argument wrong.

Each case is one call with an expectation:

* ``refuse``: bad input (a wrong shape, dtype, mask, device, scale, dropout, flag or
  hyperparameter). It is **clear** when it raises ``ValueError``/``TypeError`` whose
  message names the argument (the case's needles), **silent** when the call returns, and a
  **crash** when it raises anything else or a message that does not say what is wrong.
* ``result``: unusual but valid input (non-contiguous or expanded layouts, empty batch or
  heads or keys, broadcast masks, fully masked rows, key padding, half precision near its
  range). It is **correct** when
  the result has the defining property (equal to the same call on plain inputs, to the
  float64 reference, zeros where the contract says zeros, ...), **silent** when it returns
  something else (a wrong number, NaN), a **crash** when it raises.

``tests/test_audit.py`` runs every case and fails on any silent or crash outcome;
``python tests/audit.py`` prints the counts that docs/robustness.md quotes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attnlab
from attnlab.registry import REQUIRED

B, H, N, D = 2, 2, 32, 8
OUTCOMES = ("clear", "correct", "silent", "crash")


@dataclass(frozen=True)
class Case:
    mechanism: str
    name: str
    expect: str            # "refuse" | "result"
    call: Callable[[], object]
    needles: tuple[str, ...] = ()                      # refuse: words the message must hold
    check: Callable[[object], bool] | None = None      # result: the defining property

    @property
    def id(self) -> str:
        return f"{self.mechanism}: {self.name}"


@dataclass(frozen=True)
class Outcome:
    case: Case
    kind: str              # one of OUTCOMES
    detail: str = ""


def run_case(case: Case) -> Outcome:
    try:
        got = case.call()
    except (ValueError, TypeError) as e:
        if case.expect == "result":
            return Outcome(case, "crash", f"raised {type(e).__name__}: {e}")
        msg = str(e).lower()
        missing = [n for n in case.needles if n.lower() not in msg]
        if missing:
            return Outcome(case, "crash", f"vague {type(e).__name__} (no {missing}): {e}")
        return Outcome(case, "clear")
    except Exception as e:  # noqa: BLE001 - the audit classifies whatever comes out
        return Outcome(case, "crash", f"{type(e).__name__}: {str(e)[:300]}")
    if case.expect == "refuse":
        return Outcome(case, "silent", "accepted bad input")
    try:
        ok = bool(case.check(got))
    except Exception as e:  # noqa: BLE001
        return Outcome(case, "silent", f"result failed its check: {type(e).__name__}: {e}")
    return Outcome(case, "correct" if ok else "silent", "" if ok else "wrong result")


# ------------------------------------------------------------------ building blocks
def _inputs(b=B, h=H, nq=N, nk=N, d=D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, nk, d, generator=g, dtype=dtype)
    return q, k, v


def _context(name: str) -> dict:
    """The hyperparameters a caller must give (head_dim, num_heads, max_seq_len)."""
    ctx = {"head_dim": D, "num_heads": H, "max_seq_len": N}
    return {h.name: ctx[h.name] for h in attnlab.get(name).hparams if h.name in ctx
            and h.default is REQUIRED}


def _module(name: str, n: int = N, **hparams):
    torch.manual_seed(0)
    return attnlab.create_for(name, head_dim=D, num_heads=H, max_seq_len=n, **hparams).eval()


def _same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.isfinite(a).all()) and bool(
        torch.allclose(a.double(), b.double(), atol=tol, rtol=tol))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _plain_softmax(name: str) -> bool:
    """softmax(q k^T * scale) v itself, with no parameters of its own: compared with
    :func:`_naive_f64` (the others are compared with themselves in another layout)."""
    spec = attnlab.get(name)
    return spec.exact and not spec.learnable


def _naive_f64(q, k, v, mask=None, scale=None) -> torch.Tensor:
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


# ------------------------------------------------------------------- the case lists
def contract_cases(name: str) -> list[Case]:
    """Bad shapes, dtypes, devices, masks, flags, scale and dropout: each refused."""
    spec, m = attnlab.get(name), _module(name)
    q, k, v = _inputs()
    mask = torch.ones(N, N, dtype=torch.bool)
    meta = torch.empty(B, H, N, D, device="meta")

    def call(*args, **kw):
        return lambda: m(*args, **kw)

    bad = [
        ("q is a list", call(q.tolist(), k, v), ("q", "tensor")),
        ("q is 3-D", call(q[0], k, v), ("q", "4-D")),
        ("k is 5-D", call(q, k[None], v), ("k", "4-D")),
        ("k head dim differs", call(q, k[..., :-1], v), ("head dim",)),
        ("v length differs", call(q, k, v[:, :, :-1]), ("v", "length")),
        ("k batch differs", call(q, k[:1], v[:1]), ("batch",)),
        ("k heads differ", call(q, k[:, :1], v[:, :1]), ("heads",)),
        ("int64 inputs", call(q.long(), k.long(), v.long()), ("floating",)),
        ("k is float64", call(q, k.double(), v), ("dtype",)),
        ("k on another device", call(q, meta, v), ("meta",)),
        ("head dim 0", call(q[..., :0], k[..., :0], v), ("head dim",)),
        ("is_causal is 'yes'", call(q, k, v, is_causal="yes"), ("is_causal", "bool")),
        ("is_causal is 1", call(q, k, v, is_causal=1), ("is_causal", "bool")),
        ("need_weights is 'no'", call(q, k, v, need_weights="no"), ("need_weights", "bool")),
        ("scale < 0", call(q, k, v, scale=-1.0), ("scale",)),
        ("scale 0", call(q, k, v, scale=0.0), ("scale",)),
        ("scale nan", call(q, k, v, scale=float("nan")), ("scale",)),
        ("scale inf", call(q, k, v, scale=float("inf")), ("scale",)),
        ("scale is a str", call(q, k, v, scale="0.1"), ("scale",)),
        ("scale is True", call(q, k, v, scale=True), ("scale",)),
        ("dropout_p 1", call(q, k, v, dropout_p=1.0), ("dropout_p",)),
        ("dropout_p < 0", call(q, k, v, dropout_p=-0.1), ("dropout_p",)),
        ("dropout_p nan", call(q, k, v, dropout_p=float("nan")), ("dropout_p",)),
        ("dropout_p is a str", call(q, k, v, dropout_p="0.1"), ("dropout_p",)),
        ("mask shape", call(q, k, v, attn_mask=torch.ones(N, N + 1, dtype=torch.bool)),
         ("attn_mask",)),
        ("mask int64", call(q, k, v, attn_mask=mask.long()), ("attn_mask",)),
        ("float mask float64", call(q, k, v, attn_mask=mask.double()), ("attn_mask",)),
        ("mask 5-D", call(q, k, v, attn_mask=mask[None, None, None]), ("attn_mask",)),
        ("mask 1-D", call(q, k, v, attn_mask=mask[0]), ("attn_mask",)),
        ("mask is a list", call(q, k, v, attn_mask=mask.tolist()), ("attn_mask",)),
        ("mask on another device", call(q, k, v, attn_mask=torch.empty(
            N, N, dtype=torch.bool, device="meta")), ("attn_mask",)),
    ]
    if not spec.causal:
        bad.append(("is_causal without a causal form", call(q, k, v, is_causal=True),
                    ("causal",)))
    if not spec.arbitrary_mask:
        bad.append(("an (Nq, Nk) mask without mask support", call(q, k, v, attn_mask=mask),
                    ("attn_mask",)))
    if not spec.cross:
        qs = q[:, :, : N // 2]
        bad.append(("Nq != Nk without cross-attention", call(qs, k, v), ("nq",)))
    if not spec.returns_weights:
        bad.append(("need_weights without weights", call(q, k, v, need_weights=True),
                    ("weights",)))
    return [Case(name, what, "refuse", fn, needles) for what, fn, needles in bad]


def _bad_values(h) -> list[tuple[str, object]]:
    wrong_type = {int: "3", float: "x", str: 3, bool: "yes", tuple: "3",
                  torch.Tensor: [[True]]}.get(h.type, object())
    out = [(f"{h.name} of the wrong type", wrong_type)]
    if h.type in (int, float):
        if h.low is not None:
            out.append((f"{h.name} below its range",
                        h.low if h.low_exclusive else h.low - 1))
        if h.high is not None:
            out.append((f"{h.name} above its range", h.high + 1))
        if h.type is float:
            out.append((f"{h.name} nan", float("nan")))
    if h.choices is not None:
        out.append((f"{h.name} not a choice", "nonsense"))
    if not h.nullable and h.default is not REQUIRED:
        out.append((f"{h.name} None", None))
    return out


def hparam_cases(name: str) -> list[Case]:
    """Every hyperparameter given a wrong type, an out-of-range value, an unknown choice,
    None where it is not nullable, or left out where it is required; unknown names."""
    spec, ctx = attnlab.get(name), _context(name)
    cases = [Case(name, "unknown hyperparameter", "refuse",
                  lambda: attnlab.create(name, **ctx, wndow=3), ("wndow",))]
    for h in spec.hparams:
        if h.default is REQUIRED:
            rest = {k: v for k, v in ctx.items() if k != h.name}
            cases.append(Case(name, f"{h.name} left out", "refuse",
                              lambda rest=rest: attnlab.create(name, **rest), (h.name,)))
        for what, value in _bad_values(h):
            hp = {**ctx, h.name: value}
            cases.append(Case(name, what, "refuse",
                              lambda hp=hp: attnlab.create(name, **hp), (h.name,)))
    return cases


def layout_cases(name: str) -> list[Case]:
    """Valid inputs in unusual layouts: the same result as plain contiguous inputs."""
    m = _module(name)
    q, k, v = _inputs()

    def perm(t):  # (B, N, H, D) storage seen as (B, H, N, D): non-contiguous
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    kb, vb = k[:1].expand(B, -1, -1, -1), v[:1].expand(B, -1, -1, -1)

    def f64_check(out):
        if out.dtype != torch.float64:
            return False
        if _plain_softmax(name):
            return _same(out, _naive_f64(q, k, v, scale=m.default_scale(D)), 1e-10)
        return _same(out, m(q, k, v), 1e-4)  # the same module (same weights) in float32

    return [
        Case(name, "non-contiguous q, k, v", "result", lambda: m(perm(q), perm(k), perm(v)),
             check=lambda out: _same(out, m(q, k, v))),
        Case(name, "k, v expanded over the batch (stride 0)", "result", lambda: m(q, kb, vb),
             check=lambda out: _same(out, m(q, kb.contiguous(), vb.contiguous()))),
        Case(name, "float64 inputs", "result", lambda: _module(name).double()(
            q.double(), k.double(), v.double()), check=f64_check),
    ]


def _empty(b, h, nq, nk):
    def check(out):  # no keys: every row fully masked, so zeros (the contract)
        return tuple(out.shape) == (b, h, nq, D) and not bool(out.any())
    return check


def empty_cases(name: str) -> list[Case]:
    """An empty batch, no heads, no queries, no keys: an output of the right shape, empty
    or (no keys) zeros."""
    spec, m = attnlab.get(name), _module(name)
    # The same for every mechanism, a module built for 2 heads included: no pair to score.
    shapes = [("batch 0", (0, H, N, N)), ("heads 0", (B, 0, N, N)), ("no keys", (B, H, N, 0))
              if spec.cross else ("no tokens", (B, H, 0, 0))]
    if spec.cross:
        shapes.append(("no queries (Nq = 0)", (B, H, 0, N)))
    cases = []
    for what, (b, h, nq, nk) in shapes:
        q, k, v = _inputs(b, h, nq, nk)
        cases.append(Case(name, what, "result", lambda q=q, k=k, v=v: m(q, k, v),
                          check=_empty(b, h, nq, nk)))
    return cases


def mask_cases(name: str) -> list[Case]:
    """Masks: a 2-D mask equals its 4-D expansion; a fully masked row is zeros; padded
    keys change nothing."""
    spec, m = attnlab.get(name), _module(name)
    q, k, v = _inputs()
    cases = []
    if spec.arbitrary_mask:
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(N, N, generator=g) > 0.3
        mask[:, 0] = True
        full = mask.expand(B, H, N, N).contiguous()
        cases.append(Case(name, "2-D mask equals its 4-D expansion", "result",
                          lambda: m(q, k, v, attn_mask=mask),
                          check=lambda out: _same(out, m(q, k, v, attn_mask=full))))
        dead = torch.ones(N, N, dtype=torch.bool)
        dead[3] = False
        cases.append(Case(name, "a fully masked query row gives zeros", "result",
                          lambda: m(q, k, v, attn_mask=dead),
                          check=lambda out: bool(torch.isfinite(out).all())
                          and bool((out[:, :, 3] == 0).all())))
    if (spec.arbitrary_mask or spec.key_padding) and name not in _NOT_CONVEX:
        cases.append(one_valid_key_case(name))
    if spec.arbitrary_mask or spec.key_padding:
        keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
        keep[0, ..., N // 2:] = False
        k2, v2 = k.clone(), v.clone()
        k2[0, :, N // 2:] += 5.0
        v2[0, :, N // 2:] -= 7.0
        cases.append(Case(name, "padded keys do not change the output", "result",
                          lambda: m(q, k2, v2, attn_mask=keep),
                          check=lambda out: _same(out, m(q, k, v, attn_mask=keep), 1e-4)))
    return cases


# Mechanisms whose output is not a convex combination of the allowed keys' values: the
# low-rank ones mix keys along the length before their softmax (Linformer's E K) or
# through landmark means (Nystromformer), so one allowed key does not give that key's v;
# GAU's relu^2 weights are not normalised; the convolutions' softmax is over the kernel's
# taps, not renormalised over the allowed keys; Luong's local-p multiplies by a Gaussian
# (rows sum to less than 1); persistent memory's slots are always attended; the gated
# linear family and DeltaNet weigh values by an unnormalised (decayed) q . k, sigmoid
# attention by an unnormalised sigma, differential attention by a difference of softmaxes.
_NOT_CONVEX = ("linformer", "nystromformer", "gau", "lightweight_conv", "dynamic_conv",
               "luong_predictive", "persistent_memory", "retnet", "gla", "mamba2",
               "deltanet", "sigmoid", "differential")
_UNBOUNDED = ("gau", "retnet", "mamba2")  # nothing bounds relu^2 or (unscaled) q . k: near float16's
# range they refuse clearly


def one_valid_key_case(name: str) -> Case:
    """Only key 0 allowed, at a length of several blocks and buckets: every output row is
    v[0] (a row that can see key 0) or zeros (one that cannot), never a fraction of v[0]."""
    n = 256
    m = _module(name, n)
    q, k, v = _inputs(1, H, n, n)
    keep = torch.zeros(1, 1, 1, n, dtype=torch.bool)
    keep[..., 0] = True

    def check(out):
        v0 = v[:, :, :1].expand_as(out)
        close = lambda a, b: (a - b).abs().amax(-1) <= 1e-4 * (1 + b.abs().amax(-1))  # noqa
        return bool((close(out, v0) | close(out, torch.zeros_like(out))).all())

    return Case(name, "one allowed key gives v[key] or zeros per row", "result",
                lambda: m(q, k, v, attn_mask=keep), check=check)


def half_cases(name: str) -> list[Case]:
    """float16 inputs whose q k^T passes float16's range (|q|^2 ~ 1e5): a finite output,
    and for exact mechanisms one as close to float64 as SDPA's own."""
    spec = attnlab.get(name)
    if not spec.half_precision:
        return []
    q, k, v = _inputs()
    q, k = (q * 60).half(), (k * 60).half()
    v = v.half()
    m = _module(name).half()
    scale = m.default_scale(D)
    ref = _naive_f64(q, k, v, scale=scale)
    sdpa_err = _rel_err(F.scaled_dot_product_attention(q, k, v, scale=scale), ref)

    def check(out):
        if out.dtype != torch.float16 or not bool(torch.isfinite(out).all()):
            return False
        return _rel_err(out, ref) <= max(4 * sdpa_err, 2e-2) if _plain_softmax(name) else True

    if name in _UNBOUNDED:
        return [Case(name, "float16 near its range", "refuse", lambda: m(q, k, v),
                     ("float16",))]
    return [Case(name, "float16 near its range", "result", lambda: m(q, k, v), check=check)]


def mha_cases(name: str) -> list[Case]:
    """``attnlab.nn.MultiheadAttention`` with the mechanism: bad inputs refused."""
    torch.manual_seed(0)
    mha = attnlab.nn.MultiheadAttention(H * D, H, mechanism=name, max_seq_len=N).eval()
    x = torch.randn(B, N, H * D)
    bad = [
        ("MHA: int64 input", lambda: mha(x.long()), ("query", "floating")),
        ("MHA: float64 input into a float32 module", lambda: mha(x.double()),
         ("query", "float64")),
        ("MHA: wrong feature size", lambda: mha(x[..., :-1]), ("query", "feature")),
        ("MHA: 2-D input", lambda: mha(x[0]), ("query", "3-d")),
        ("MHA: need_weights is 'no'", lambda: mha(x, need_weights="no"),
         ("need_weights", "bool")),
        ("MHA: key_padding_mask shape", lambda: mha(
            x, key_padding_mask=torch.ones(B, N + 1, dtype=torch.bool)),
         ("key_padding_mask",)),
    ]
    return [Case(name, what, "refuse", fn, needles) for what, fn, needles in bad]


# (Different tensor hyperparameters through attnlab.attention, the stale-cache case, are
# tests/test_bad_input_library.py's: it finds every collection-valued hyperparameter.)
FAMILIES_OF_CASES = (contract_cases, hparam_cases, layout_cases, empty_cases, mask_cases,
                     half_cases, mha_cases)


def library_cases(names: list[str] | None = None) -> list[Case]:
    out = []
    for name in names or attnlab.list_mechanisms():
        for make in FAMILIES_OF_CASES:
            out.extend(make(name))
    return out


def tally(outcomes: list[Outcome]) -> Counter:
    c = Counter(o.kind for o in outcomes)
    return Counter({k: c.get(k, 0) for k in OUTCOMES})


def main() -> None:
    outcomes = [run_case(c) for c in library_cases()]
    counts = tally(outcomes)
    print(f"library: {len(outcomes)} cases: " + ", ".join(f"{counts[k]} {k}"
                                                          for k in OUTCOMES))
    for o in outcomes:
        if o.kind in ("silent", "crash"):
            print(f"  {o.kind:6s} {o.case.id}: {o.detail}")


if __name__ == "__main__":
    main()
