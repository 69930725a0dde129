"""Inpainting: masks (seeded, right coverage), the ViT with several mechanisms and the U-Net
(shapes at 28x28 and 8x8, the output is the input outside the mask, no leak of the
missing pixels, the loss falls on real digits), attention maps, config round trip, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from attnlab.data.inpaint import apply_mask, make_masks, mask_coverage
from attnlab.models.vision import UNetInpainter, ViTInpainter, inpainting_loss

TINY = {"d_model": 32, "num_heads": 4, "num_layers": 2}
# Mechanisms the ViT is trained with below, with hyperparameters that fit N = 16 patches.
MECHANISMS = [("sdpa", {}), ("flash", {"block_q": 8, "block_k": 8}), ("linear", {}),
              ("nystromformer", {"num_landmarks": 4}), ("performer", {"num_features": 16})]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _strokes(n: int, size: int) -> torch.Tensor:
    """Fallback images: a few random anti-aliased line segments per image."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(2):
            a, b = torch.rand(2, 2, generator=g) * size
            d = b - a
            t = (((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / d.square().sum()).clamp(0, 1)
            dist = ((xx - a[0] - t * d[0]) ** 2 + (yy - a[1] - t * d[1]) ** 2).sqrt()
            out[i, 0] = torch.maximum(out[i, 0], (1.5 - dist).clamp(0, 1))
    return out


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """16 real 8x8 handwritten digits in [0, 1] (scikit-learn's bundled copy, no download);
    synthetic strokes when scikit-learn is absent."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return _strokes(16, 8)
    return torch.tensor(load_digits().images[:16] / 16.0, dtype=torch.float32)[:, None]


@pytest.fixture(scope="module")
def digits28(digits) -> torch.Tensor:
    return F.interpolate(digits, size=28, mode="bilinear", align_corners=False).clamp(0, 1)


# ---------------------------------------------------------------------------- masks

@given(n=st.integers(1, 5), h=st.integers(1, 20), w=st.integers(1, 20),
       seed=st.integers(0, 2**31), kind=st.sampled_from(["box", "half"]))
def test_masks_are_seeded_and_deterministic(n, h, w, seed, kind):
    a = make_masks(n, h, w, kind=kind, seed=seed)
    assert a.dtype == torch.bool and a.shape == (n, 1, h, w)
    assert torch.equal(a, make_masks(n, h, w, kind=kind, seed=seed))


def test_masks_differ_across_seeds_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    a = make_masks(8, 28, 28, kind="random_patches", seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert not torch.equal(a, make_masks(8, 28, 28, kind="random_patches", seed=2))
    assert not torch.equal(a[0], a[1])  # one draw per image, not one for the batch


@given(n=st.integers(1, 6), h=st.integers(2, 30), w=st.integers(2, 30),
       lo=st.floats(0.05, 1.0), span=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_box_is_one_rectangle_of_the_requested_size(n, h, w, lo, span, seed):
    hi = lo + (1.0 - lo) * span
    m = make_masks(n, h, w, kind="box", box_size=(lo, hi), seed=seed)[:, 0]
    for img in m:
        rows, cols = img.any(1).nonzero()[:, 0], img.any(0).nonzero()[:, 0]
        bh, bw = len(rows), len(cols)
        # contiguous, and every pixel of the bounding box is missing: a solid rectangle
        assert rows[-1] - rows[0] + 1 == bh and cols[-1] - cols[0] + 1 == bw
        assert img.sum() == bh * bw
        for side, size in ((bh, h), (bw, w)):
            assert max(1, math.floor(lo * size)) <= side <= min(size, max(1, math.ceil(hi * size)))


def test_box_positions_cover_the_image():
    m = make_masks(400, 8, 8, kind="box", box_size=0.25, seed=0)
    assert (m.flatten(1).sum(1) == 4).all()  # 2x2 boxes
    assert m.any(0).all()  # corners included: the top-left corner is drawn over all 7x7 places


@pytest.mark.parametrize("size,patch", [(28, 4), (8, 2), (8, 4), (28, 7)])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_random_patches_exact_count_and_aligned_to_the_vit_patch(size, patch, fraction):
    m = make_masks(6, size, size, kind="random_patches", patch_size=patch,
                   patch_fraction=fraction, seed=3)
    g = size // patch
    blocks = m[:, 0].reshape(6, g, patch, g, patch).permute(0, 1, 3, 2, 4).flatten(3)
    assert (blocks.all(-1) | ~blocks.any(-1)).all()  # each patch all missing or all seen
    per_image = blocks.all(-1).flatten(1).sum(1)
    assert (per_image == round(fraction * g * g)).all()
    assert torch.allclose(mask_coverage(m), per_image.float() / (g * g))


def test_random_patches_are_uniform_over_positions():
    m = make_masks(2000, 8, 8, kind="random_patches", patch_size=2, patch_fraction=0.25, seed=0)
    freq = m[:, 0, ::2, ::2].float().mean(0)  # each of 16 patches: expected 0.25
    assert (freq - 0.25).abs().max() < 0.05  # 5 sigma for a binomial(2000, 0.25)


@pytest.mark.parametrize("h,w", [(28, 28), (8, 8), (7, 5)])
def test_half_masks(h, w):
    expect = {
        "bottom": torch.arange(h)[:, None].expand(h, w) >= h // 2,
        "top": torch.arange(h)[:, None].expand(h, w) < h - h // 2,
        "left": torch.arange(w)[None].expand(h, w) < w - w // 2,
        "right": torch.arange(w)[None].expand(h, w) >= w // 2,
    }
    for side, e in expect.items():
        assert torch.equal(make_masks(3, h, w, kind="half", half_side=side)[:, 0],
                           e.expand(3, h, w))
    r = make_masks(200, h, w, kind="half", half_side="random", seed=5)[:, 0]
    seen = {side for side, e in expect.items() for img in r[:40] if torch.equal(img, e)}
    assert seen == set(expect)  # every mask is one of the four halves and all four occur
    assert all(any(torch.equal(img, e) for e in expect.values()) for img in r)


def test_apply_mask(digits):
    m = make_masks(16, 8, 8, kind="box", seed=0)
    x3 = digits.expand(16, 3, 8, 8).clone()
    before = x3.clone()
    out = apply_mask(x3, m, fill=0.5)
    assert torch.equal(x3, before)  # a copy
    assert (out[m.expand_as(out)] == 0.5).all()
    assert torch.equal(out[~m.expand_as(out)], x3[~m.expand_as(x3)])


@pytest.mark.parametrize("call,exc,match", [
    (lambda: make_masks(0, 8, 8), ValueError, "n must be >= 1"),
    (lambda: make_masks(2, True, 8), TypeError, "h must be an int"),
    (lambda: make_masks(2, 8, 8, kind="circle"), ValueError, "kind must be one of"),
    (lambda: make_masks(2, 8, 8, box_size=(0.6, 0.4)), ValueError, "box_size"),
    (lambda: make_masks(2, 8, 8, box_size=0.0), ValueError, "box_size"),
    (lambda: make_masks(2, 8, 8, box_size="big"), TypeError, "box_size"),
    (lambda: make_masks(2, 28, 28, kind="random_patches", patch_size=3), ValueError, "patch_size=3"),
    (lambda: make_masks(2, 8, 8, kind="random_patches", patch_fraction=1.5), ValueError, "patch_fraction"),
    (lambda: make_masks(2, 8, 8, kind="half", half_side="middle"), ValueError, "half_side"),
    (lambda: make_masks(2, 8, 8, seed=1.5), TypeError, "seed"),
    (lambda: apply_mask(torch.rand(2, 1, 8, 8), torch.ones(2, 1, 8, 8)), TypeError, "mask must be a bool"),
    (lambda: apply_mask(torch.rand(2, 1, 8, 8), torch.ones(2, 1, 4, 4, dtype=torch.bool)), ValueError, "mask must be"),
])
def test_mask_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------- models

def vit(size=8, patch=2, **kw):
    return ViTInpainter(size, patch, **{**TINY, **kw}).eval()


def unet(**kw):
    return UNetInpainter(**{"base_channels": 8, **kw}).eval()


@pytest.mark.parametrize("size,patch", [(28, 4), (8, 2), (8, 4)])
@pytest.mark.parametrize("model", ["vit", "unet", "unet3"])
def test_shapes_and_output_is_input_outside_the_mask(model, size, patch, digits, digits28):
    x = digits28 if size == 28 else digits
    m = make_masks(len(x), size, size, kind="random_patches", patch_size=patch, seed=1)
    net = {"vit": lambda: vit(size, patch), "unet": unet, "unet3": lambda: unet(depth=3)}[model]()
    y = net(apply_mask(x, m), m)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[~m.expand_as(y)], x[~m.expand_as(x)])  # exactly, not approximately
    inside = y[m.expand_as(y)]
    assert ((inside > 0) & (inside < 1)).all()  # a sigmoid


@pytest.mark.parametrize("make", [lambda: vit(), unet], ids=["vit", "unet"])
def test_missing_pixels_never_leak(make, digits):
    """Whatever the caller leaves under the mask (the true pixels, noise, a fill value), the
    output is the same: the models cannot cheat by reading the answer."""
    net = make()
    m = make_masks(16, 8, 8, kind="box", seed=2)
    a = net(digits, m)
    for fill in (0.0, 0.7):
        assert torch.equal(net(apply_mask(digits, m, fill=fill), m), a)
    noisy = torch.where(m, torch.rand_like(digits), digits)
    assert torch.equal(net(noisy, m), a)


@pytest.mark.parametrize("make", [lambda: vit(), unet], ids=["vit", "unet"])
def test_predictions_read_the_visible_context(make, digits):
    """A missing pixel's prediction depends on visible pixels elsewhere (in another patch)."""
    net = make()
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m[..., 6:, 6:] = True  # the bottom-right patch is missing
    x = digits[:1].clone().requires_grad_(True)
    net(x, m)[0, 0, 7, 7].backward()
    grad = x.grad[0, 0]
    assert grad[:2, :2].abs().sum() > 0  # the top-left patch, two patches away
    assert (grad[6:, 6:] == 0).all()  # the missing pixels themselves: no influence


def _train(net, x, m, steps, lr=3e-3):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    losses = []
    for _ in range(steps):
        loss = inpainting_loss(net(apply_mask(x, m), m), x, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        losses.append(inpainting_loss(net(apply_mask(x, m), m), x, m).item())
    return losses


@pytest.mark.parametrize("mechanism,kwargs", MECHANISMS, ids=[m for m, _ in MECHANISMS])
def test_vit_loss_falls_with_each_mechanism(mechanism, kwargs, digits):
    m = make_masks(16, 8, 8, kind="random_patches", patch_size=2, seed=0)
    net = ViTInpainter(8, 2, mechanism=mechanism, mechanism_kwargs=kwargs, **TINY)
    losses = _train(net, digits, m, steps=25)
    assert all(map(math.isfinite, losses))
    assert losses[-1] < 0.75 * losses[0], losses


def test_vit_loss_falls_at_28x28(digits28):
    m = make_masks(8, 28, 28, kind="random_patches", patch_size=4, seed=0)
    losses = _train(ViTInpainter(28, 4, positions="sinusoidal", **TINY), digits28[:8], m, 15)
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.parametrize("size", [8, 28])
def test_unet_learns_beyond_the_mean_image(size, digits, digits28):
    """The U-Net does not just learn the mean: it beats the per-pixel mean of the batch."""
    x = digits if size == 8 else digits28[:8]
    m = make_masks(len(x), size, size, kind="box", box_size=(0.3, 0.5), seed=0)
    mean_image = inpainting_loss(x.mean(0, keepdim=True).expand_as(x), x, m).item()
    losses = _train(UNetInpainter(base_channels=8), x, m, steps=40)
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < mean_image, (losses, mean_image)


def test_exact_mechanisms_give_the_same_model(digits):
    """The mechanism is really the one plugged in: same weights, exact mechanisms agree;
    an approximate one differs."""
    m = make_masks(16, 8, 8, seed=0)
    nets = {n: ViTInpainter(8, 2, mechanism=n, **TINY).double().eval()
            for n in ("sdpa", "reference", "flash", "linear")}
    state = nets["sdpa"].state_dict()
    outs = {}
    for n, net in nets.items():
        net.load_state_dict(state)
        outs[n] = net(digits.double(), m)
    torch.testing.assert_close(outs["reference"], outs["sdpa"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs["flash"], outs["sdpa"], rtol=1e-10, atol=1e-10)
    assert (outs["linear"] - outs["sdpa"]).abs().max() > 1e-4


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope", "alibi"])
def test_positions(positions, digits):
    net = vit(positions=positions)
    m = make_masks(16, 8, 8, seed=0)
    assert net(digits, m).shape == digits.shape
    names = set(net.state_dict())
    assert ("pos_embed" in names) == (positions == "learned")
    assert not any("pos_table" in k for k in names)  # fixed tables are not state
    if positions == "sinusoidal":
        t = net.pos_table[0]  # (16, 32): row code in the first half, column in the second
        assert torch.equal(t[0, :16], t[3, :16]) and not torch.equal(t[0, :16], t[4, :16])
        assert torch.equal(t[0, 16:], t[4, 16:]) and not torch.equal(t[0, 16:], t[1, 16:])


def test_attention_maps(digits):
    net = vit(num_layers=3, dropout=0.5).double().train()
    x, m = digits[:2].double(), make_masks(2, 8, 8, seed=0)
    maps = net.attention_maps(x, m)
    assert net.training  # restored after the eval-mode pass
    for a, b in zip(maps, net.attention_maps(x, m), strict=True):
        assert torch.equal(a, b)  # no dropout: deeper layers' maps are deterministic
    net.eval()
    assert len(maps) == 3 and all(w.shape == (2, 4, 16, 16) for w in maps)
    for w in maps:
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 16, dtype=torch.float64))
    # Layer 0 recomputed by hand from the block's own projections.
    xin = torch.cat([x.masked_fill(m, 0.0), m.double()], 1)
    h = net.embed(net.patchify(xin)) + net.pos_embed
    blk = net.blocks[0]
    z = blk.norm1(h)
    q = blk.attn.q_proj(z).view(2, 16, 4, 8).transpose(1, 2)
    k = blk.attn.k_proj(z).view(2, 16, 4, 8).transpose(1, 2)
    torch.testing.assert_close(maps[0], torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1))
    # flash never forms its weights; its effective ones are the same softmax
    fl = vit(num_layers=3, mechanism="flash").double()
    fl.load_state_dict(net.state_dict())
    for a, b in zip(fl.attention_maps(x, m), maps, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls,kw", [
    (ViTInpainter, {"image_size": 8, "patch_size": 2, "mechanism": "nystromformer",
                    "mechanism_kwargs": {"num_landmarks": 4}, "positions": "rope", **TINY}),
    (ViTInpainter, {}),
    (UNetInpainter, {"in_channels": 3, "base_channels": 4, "depth": 3}),
])
def test_config_round_trip(cls, kw):
    a = cls(**kw)
    config = json.loads(json.dumps(a.config))
    b = cls(**config)
    assert b.config == a.config and b.num_parameters() == a.num_parameters()
    assert a.num_parameters() == sum(p.numel() for p in a.parameters())
    b.load_state_dict(a.state_dict())  # strict: the same architecture
    a.eval()
    b.eval()
    c, s = a.config["in_channels"], a.config.get("image_size", 8)
    x, m = torch.rand(2, c, s, s), make_masks(2, s, s, seed=0)
    assert torch.equal(a(x, m), b(x, m))


def test_inpainting_loss():
    pred, target = torch.rand(3, 2, 5, 5, requires_grad=True), torch.rand(3, 2, 5, 5)
    m = make_masks(3, 5, 5, kind="box", seed=0)
    sq, count = 0.0, 0
    for idx in (m.expand(3, 2, 5, 5)).nonzero().tolist():
        sq += (pred[tuple(idx)] - target[tuple(idx)]).item() ** 2
        count += 1
    loss = inpainting_loss(pred, target, m)
    assert loss.item() == pytest.approx(sq / count, rel=1e-6)
    loss.backward()
    assert (pred.grad[~m.expand_as(pred)] == 0).all()  # only missing pixels count
    none = torch.zeros(3, 1, 5, 5, dtype=torch.bool)
    zero = inpainting_loss(pred, target, none)
    assert zero.item() == 0.0 and zero.requires_grad


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ViTInpainter(28, 5), ValueError, "image_size must be divisible by patch_size; got image_size=28, patch_size=5"),
    (lambda: ViTInpainter(28, 4, d_model=30, num_heads=4), ValueError, "d_model must be divisible by num_heads"),
    (lambda: ViTInpainter(28, 4, positions="absolute"), ValueError, "positions must be one of"),
    (lambda: ViTInpainter(28, 4, d_model=30, num_heads=5, positions="sinusoidal"), ValueError, "divisible by 4"),
    (lambda: ViTInpainter(28, 4, mechanism="sdpaa"), ValueError, "did you mean 'sdpa'"),
    (lambda: ViTInpainter(28, 4, mechanism_kwargs={"x": object()}), TypeError, "mechanism_kwargs must be JSON"),
    (lambda: ViTInpainter(28, 4, mechanism_kwargs=[1]), TypeError, "mechanism_kwargs must be a dict"),
    (lambda: ViTInpainter(28, 4, mechanism="sdpa", mechanism_kwargs={"window": 3}), TypeError, "unknown hyperparameter"),
    (lambda: ViTInpainter(28, 4, mechanism="linear", positions="alibi"), ValueError, "arbitrary mask"),
    (lambda: ViTInpainter(28, 4, num_layers=0), ValueError, "num_layers must be >= 1"),
    (lambda: ViTInpainter(28, 4, dropout=1.0), ValueError, "dropout"),
    (lambda: ViTInpainter(28, True), TypeError, "patch_size must be an int"),
    (lambda: UNetInpainter(depth=0), ValueError, "depth must be >= 1"),
    (lambda: UNetInpainter(base_channels=2.0), TypeError, "base_channels must be an int"),
    (lambda: vit()(torch.rand(2, 1, 28, 28), make_masks(2, 28, 28)), ValueError, "must be 8x8"),
    (lambda: vit()(torch.rand(2, 3, 8, 8), make_masks(2, 8, 8)), ValueError, r"\(B, 1, H, W\)"),
    (lambda: vit()(torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)), TypeError, "mask must be a bool"),
    (lambda: unet()(torch.rand(2, 1, 8, 8), make_masks(3, 8, 8)), ValueError, "mask must be"),
    (lambda: inpainting_loss(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 5), make_masks(2, 4, 4)), ValueError, "same shape"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
