"""attnlab.train.metrics against independent references: scikit-learn for classification,
NumPy float64 from the papers' formulas for PSNR and SSIM (and scikit-image if installed),
analytic cases, crafted training curves, and errors."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from attnlab.train.metrics import (
    Convergence,
    accuracy,
    confusion_matrix,
    convergence,
    macro_f1,
    mean_std,
    per_class_f1,
    perplexity,
    psnr,
    ssim,
)


@pytest.fixture(scope="module")
def skm():
    return pytest.importorskip("sklearn.metrics")


@st.composite
def labelled(draw, max_classes=7):
    """(preds, targets, num_classes): class ids, some classes possibly absent."""
    c = draw(st.integers(1, max_classes))
    n = draw(st.integers(1, 40))
    ids = st.integers(0, c - 1)
    t = draw(st.lists(ids, min_size=n, max_size=n))
    p = draw(st.lists(ids, min_size=n, max_size=n))
    return np.array(p), np.array(t), c


# ---------------------------------------------------------------------------- classification

@pytest.mark.filterwarnings("ignore:A single label was found")
@given(data=labelled())
def test_classification_matches_sklearn(skm, data):
    p, t, c = data
    assert accuracy(p, t) == pytest.approx(skm.accuracy_score(t, p), abs=1e-12)
    cm = confusion_matrix(torch.tensor(p), torch.tensor(t), c)
    assert cm.dtype == torch.int64
    np.testing.assert_array_equal(cm.numpy(), skm.confusion_matrix(t, p, labels=range(c)))
    # macro: sklearn's default labels = the classes present in targets or preds
    assert macro_f1(p, t, c) == pytest.approx(
        skm.f1_score(t, p, average="macro", zero_division=0), abs=1e-12)
    np.testing.assert_allclose(
        per_class_f1(p, t, c).numpy(),
        skm.f1_score(t, p, labels=range(c), average=None, zero_division=0), atol=1e-12)


def test_macro_f1_leaves_out_classes_absent_from_both():
    # 5 classes; classes 3 and 4 never occur. Class 2 occurs only as a prediction (F1 0).
    t, p = [0, 0, 1, 1], [0, 1, 1, 2]
    f0 = 2 * 1 / (2 * 1 + 0 + 1)  # TP 1, FP 0, FN 1
    f1 = 2 * 1 / (2 * 1 + 1 + 1)  # TP 1, FP 1, FN 1
    f2 = 0.0  # TP 0, FP 1
    assert per_class_f1(p, t, 5).tolist() == pytest.approx([f0, f1, f2, 0.0, 0.0])
    assert macro_f1(p, t, 5) == pytest.approx((f0 + f1 + f2) / 3)


@given(data=labelled(), seed=st.integers(0, 2**31))
def test_accuracy_from_logits(skm, data, seed):
    p, t, c = data
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(t), c, generator=g)
    logits[torch.arange(len(p)), torch.tensor(p)] += 100.0  # argmax = p
    assert accuracy(logits, torch.tensor(t)) == pytest.approx(skm.accuracy_score(t, p))
    assert accuracy(logits.reshape(1, len(t), c), torch.tensor(t)[None]) == pytest.approx(
        skm.accuracy_score(t, p))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: accuracy([0, 1], [0, 1, 1]), ValueError, "shaped like targets"),
    (lambda: accuracy([], []), ValueError, "empty"),
    (lambda: accuracy(torch.tensor([0.0, 1.0]), [0, 1]), TypeError, "integer class ids"),
    (lambda: confusion_matrix([0, 3], [0, 1], 3), ValueError, r"preds must be class ids in \[0, 3\); got values in \[0, 3\]"),
    (lambda: confusion_matrix([0, 1], [-1, 1], 3), ValueError, "targets must be class ids"),
    (lambda: macro_f1([0, 1], [0, 1], 0), ValueError, "num_classes"),
    (lambda: per_class_f1([0, 1], [0], 2), ValueError, "same number of elements"),
])
def test_classification_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------- perplexity

@given(st.floats(0, 700), st.integers(1, 10**6))
def test_perplexity(mean_nll, tokens):
    nll = mean_nll * tokens
    assert perplexity(nll, tokens) == pytest.approx(math.exp(nll / tokens), rel=1e-12)


def test_perplexity_edges():
    assert perplexity(710.0 * 3, 3) == math.inf  # exp(710) overflows a float64
    assert perplexity(math.inf, 5) == math.inf
    assert math.isnan(perplexity(math.nan, 5))
    assert perplexity(torch.tensor(2.0 * 7), torch.tensor(7)) == pytest.approx(math.e ** 2)
    assert perplexity(0.0, 4) == 1.0
    with pytest.raises(ValueError, match="total_tokens must be > 0; got 0"):
        perplexity(1.0, 0)
    with pytest.raises(ValueError, match="total_nll must be >= 0"):
        perplexity(-1.0, 3)


# ---------------------------------------------------------------------------- PSNR

def psnr_ref(p: np.ndarray, t: np.ndarray, L: float = 1.0) -> float:
    per = [10 * math.log10(L * L / np.mean((a - b) ** 2)) for a, b in zip(p, t, strict=True)]
    return float(np.mean(per))


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 9), st.integers(0, 2**31),
       st.floats(0.5, 255.0))
def test_psnr_matches_numpy(n, c, s, seed, L):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, L, (n, c, s, s))
    p = np.clip(t + rng.normal(0, 0.1 * L, t.shape), 0, L)
    assume(np.all(np.mean((p - t) ** 2, axis=(1, 2, 3)) > 0))
    assert psnr(torch.tensor(p), torch.tensor(t), data_range=L) == pytest.approx(
        psnr_ref(p, t, L), rel=1e-10)


@pytest.mark.parametrize("c", [0.5, 0.1, 1 / 255])
@pytest.mark.parametrize("L", [1.0, 255.0])
def test_psnr_constant_offset(c, L):
    t = torch.rand(3, 1, 8, 8, dtype=torch.float64) * L * 0.5
    p = t + c * L  # mse = (cL)^2 -> 10 log10(L^2 / (cL)^2) = 10 log10(1 / c^2)
    assert psnr(p, t, data_range=L) == pytest.approx(10 * math.log10(1 / c ** 2), rel=1e-9)


def test_psnr_is_per_image_then_mean():
    t = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    p = t.clone()
    p[0] += 0.1
    p[1] += 0.01
    per = psnr(p, t, reduction="none")
    assert per.tolist() == pytest.approx([20.0, 40.0])
    assert psnr(p, t) == pytest.approx(30.0)  # not 10 log10(1 / mean mse) = 22.97
    assert psnr(t, t) == math.inf  # identical: +inf, no cap
    assert psnr(p[:1], p[:1], reduction="none").tolist() == [math.inf]
    assert psnr(torch.cat([t, p[:1]]), torch.cat([t, t[:1]]), max_db=100.0) == pytest.approx(
        (100 + 100 + 20) / 3)  # capped per image, before the mean


def test_psnr_mask_counts_only_missing_pixels():
    t = torch.zeros(2, 2, 6, 6, dtype=torch.float64)
    m = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    m[0, :, :3] = True  # half of image 0 missing; image 1 has no missing pixel
    p = t + 0.2 * m  # error 0.2 on the missing pixels only, both channels
    assert psnr(p, t, mask=m) == pytest.approx(10 * math.log10(1 / 0.04))
    # unmasked, image 0 has mse 0.04 / 2 and image 1 is perfect
    assert psnr(p, t, reduction="none").tolist() == pytest.approx(
        [10 * math.log10(2 / 0.04), math.inf])
    per = psnr(p, t, mask=m, reduction="none")
    assert per[0].item() == pytest.approx(13.9794, abs=1e-4) and math.isnan(per[1])
    p2 = p.clone()
    p2[~m.expand_as(p2)] = 0.9  # errors outside the mask do not count
    assert psnr(p2, t, mask=m) == psnr(p, t, mask=m)
    assert math.isnan(psnr(p, t, mask=m, reduction="none", max_db=50.0)[1])
    with pytest.raises(ValueError, match="no missing pixel"):
        psnr(p, t, mask=torch.zeros_like(m))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: psnr(torch.rand(2, 4), torch.rand(2, 5)), ValueError, "same shape"),
    (lambda: psnr(torch.rand(2, 4), torch.rand(2, 4), data_range=0), ValueError, "data_range"),
    (lambda: psnr(torch.rand(2, 4), torch.rand(2, 4), mask=torch.ones(2, 4)), TypeError, "mask must be bool"),
    (lambda: psnr(torch.rand(2, 4), torch.rand(2, 4), reduction="sum"), ValueError, "reduction"),
    (lambda: psnr(torch.rand(4), torch.rand(4)), ValueError, "batch of images"),
    (lambda: psnr(torch.rand(2, 4), torch.rand(2, 4), max_db="100"), ValueError, "max_db"),
])
def test_psnr_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------- SSIM

def ssim_ref(p: np.ndarray, t: np.ndarray, L: float, window: str, size: int,
             sigma: float = 1.5) -> np.ndarray:
    """Per-image mean SSIM straight from Wang et al. 2004, window by window, in float64.

    Gaussian: eqs. 14-16 (weights w summing to 1, weighted moments). Uniform: eq. 4
    (plain means, unbiased sample (co)variances over the n = size^2 pixels).
    """
    r = (size - 1) / 2
    ii, jj = np.meshgrid(np.arange(size) - r, np.arange(size) - r, indexing="ij")
    w = np.exp(-(ii ** 2 + jj ** 2) / (2 * sigma ** 2)) if window == "gaussian" else np.ones_like(ii)
    w = w / w.sum()
    C1, C2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    out = []
    for a_img, b_img in zip(p, t, strict=True):
        vals = []
        for a_ch, b_ch in zip(a_img, b_img, strict=True):
            H, W = a_ch.shape
            for i in range(H - size + 1):
                for j in range(W - size + 1):
                    x, y = a_ch[i:i + size, j:j + size], b_ch[i:i + size, j:j + size]
                    mx, my = (w * x).sum(), (w * y).sum()
                    if window == "gaussian":
                        vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
                        cxy = (w * (x - mx) * (y - my)).sum()
                    else:
                        n = size * size
                        vx, vy = ((x - mx) ** 2).sum() / (n - 1), ((y - my) ** 2).sum() / (n - 1)
                        cxy = ((x - mx) * (y - my)).sum() / (n - 1)
                    vals.append((2 * mx * my + C1) * (2 * cxy + C2)
                                / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2)))
        out.append(np.mean(vals))
    return np.array(out)


@given(n=st.integers(1, 2), c=st.integers(1, 2), h=st.integers(3, 13), w=st.integers(3, 13),
       seed=st.integers(0, 2**31), noise=st.floats(0.0, 0.5), window=st.sampled_from(["gaussian", "uniform"]),
       L=st.sampled_from([1.0, 255.0]))
def test_ssim_matches_the_paper_formula(n, c, h, w, seed, noise, window, L):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, L, (n, c, h, w))
    p = np.clip(t + rng.normal(0, noise * L, t.shape), 0, L)
    full = 11 if window == "gaussian" else 7
    size = min(full, min(h, w) if min(h, w) % 2 else min(h, w) - 1)
    expect = ssim_ref(p, t, L, window, size)
    got = ssim(torch.tensor(p), torch.tensor(t), data_range=L, window=window, reduction="none")
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-9, atol=1e-12)
    assert ssim(torch.tensor(p), torch.tensor(t), data_range=L, window=window) == pytest.approx(
        float(expect.mean()), rel=1e-9, abs=1e-12)
    if c == 1:  # (N, H, W) is the same as (N, 1, H, W)
        assert ssim(torch.tensor(p[:, 0]), torch.tensor(t[:, 0]), data_range=L, window=window) == \
            pytest.approx(float(expect.mean()), rel=1e-9, abs=1e-12)


def test_ssim_analytic_cases():
    x = torch.rand(3, 1, 12, 12, dtype=torch.float64)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    y = torch.rand(3, 1, 12, 12, dtype=torch.float64)
    assert ssim(x, y) == pytest.approx(ssim(y, x), rel=1e-12)  # symmetric
    # Two constant images a, b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, C1 = 0.3, 0.6, 0.01 ** 2
    ca, cb = torch.full((1, 8, 8), a), torch.full((1, 8, 8), b)
    for window in ("gaussian", "uniform"):
        assert ssim(ca, cb, window=window) == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1),
                                                            rel=1e-6)
    # A contrast-inverted image scores below zero.
    assert ssim(x, 1 - x) < 0


def test_ssim_window_sizes():
    g = torch.Generator().manual_seed(0)
    p, t = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    # 8x8 digits: the 11x11 Gaussian does not fit, 7x7 is used (same as asking for it).
    assert ssim(p, t) == ssim(p, t, win_size=7)
    assert ssim(p, t, window="uniform") == ssim(p, t, window="uniform", win_size=7)
    p28, t28 = torch.rand(2, 1, 28, 28, generator=g), torch.rand(2, 1, 28, 28, generator=g)
    assert ssim(p28, t28) == ssim(p28, t28, win_size=11)
    assert ssim(p28, t28) != ssim(p28, t28, win_size=7)
    np.testing.assert_allclose(ssim(p28[:1], t28[:1], win_size=5, sigma=0.8),
                               ssim_ref(p28[:1].double().numpy(), t28[:1].double().numpy(), 1.0,
                                        "gaussian", 5, 0.8), rtol=1e-6)


@pytest.mark.parametrize("shape", [(20, 24), (28, 28), (8, 8)])
def test_ssim_against_scikit_image(shape):
    skmetrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1, shape)
    p = np.clip(t + rng.normal(0, 0.1, t.shape), 0, 1)
    ours = ssim(torch.tensor(p)[None], torch.tensor(t)[None], window="uniform")
    assert ours == pytest.approx(skmetrics.structural_similarity(p, t, data_range=1.0), rel=1e-9)
    if min(shape) >= 11:  # scikit-image's Gaussian is always 11 wide
        ours = ssim(torch.tensor(p)[None], torch.tensor(t)[None])
        assert ours == pytest.approx(skmetrics.structural_similarity(
            p, t, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False),
            rel=1e-9)


@pytest.mark.parametrize("kw,exc,match", [
    ({"window": "box"}, ValueError, "window must be"),
    ({"win_size": 9}, ValueError, "win_size=9 is larger than the images"),
    ({"win_size": 4}, ValueError, "odd int"),
    ({"win_size": 1}, ValueError, "odd int"),
    ({"sigma": 0}, ValueError, "sigma"),
    ({"data_range": -1}, ValueError, "data_range"),
])
def test_ssim_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        ssim(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), **kw)


def test_ssim_shape_errors():
    with pytest.raises(ValueError, match="at least 3x3"):
        ssim(torch.rand(2, 2, 2), torch.rand(2, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, C, H, W\)"):
        ssim(torch.rand(2, 1, 1, 8, 8), torch.rand(2, 1, 1, 8, 8))


# ---------------------------------------------------------------------------- curves

def test_convergence_max_mode():
    steps = [10, 20, 30, 40, 50]
    times = [1.0, 2.0, 3.0, 4.0, 5.0]
    acc = [0.2, 0.6, 0.93, 0.97, 0.95]  # best 0.97 -> threshold 0.9215
    assert convergence(steps, times, acc) == Convergence(30, 3.0)
    assert convergence(steps, times, acc, fraction=1.0) == (40, 4.0)
    assert convergence(steps, times, acc, fraction=0.5) == (20, 2.0)
    # against another run's best: reached late, or never
    assert convergence(steps, times, acc, reference=1.0) == (40, 4.0)
    assert convergence(steps, times, acc, reference=1.1) is None


def test_convergence_min_mode():
    steps, times = [1, 2, 3, 4, 5, 6], [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    loss = [5.0, 2.0, 1.06, 1.04, 1.0, 1.2]  # best 1.0 -> within 1/0.95 = 1.0526
    assert convergence(steps, times, loss, mode="min") == (4, 2.0)
    assert convergence(steps, times, loss, mode="min", fraction=0.9) == (3, 1.5)
    assert convergence(steps, times, loss, mode="min", reference=0.5) is None


def test_convergence_edges():
    nan = math.nan
    assert convergence([1, 2, 3], [0.1, 0.2, 0.3], [nan, 0.99, 1.0]) == (2, 0.2)  # nan skipped
    assert convergence([], [], []) is None
    assert convergence([1, 2], [0.1, 0.2], [nan, nan]) is None
    assert convergence(np.array([5, 6]), torch.tensor([1.0, 2.0]), (0.0, 0.0)) == (5, 1.0)
    with pytest.raises(ValueError, match="same length"):
        convergence([1, 2], [0.1], [0.5, 0.6])
    with pytest.raises(ValueError, match="mode must be"):
        convergence([1], [0.1], [0.5], mode="best")
    with pytest.raises(ValueError, match="fraction must be in"):
        convergence([1], [0.1], [0.5], fraction=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        convergence([1], [0.1], [-0.5])


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=30))
def test_mean_std(xs):
    m, s = mean_std(xs)
    assert m == pytest.approx(statistics.fmean(xs), rel=1e-9, abs=1e-6)
    assert s == pytest.approx(statistics.stdev(xs) if len(xs) > 1 else 0.0, rel=1e-9, abs=1e-6)


def test_mean_std_edges():
    assert mean_std([3.0]) == (3.0, 0.0)
    assert mean_std(torch.tensor([1.0, 3.0])) == (2.0, pytest.approx(math.sqrt(2)))
    with pytest.raises(ValueError, match="empty"):
        mean_std([])
