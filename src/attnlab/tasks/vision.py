"""Image inpainting: reconstruct masked pixels with a patch transformer or a small U-Net.

Training masks are drawn afresh for every batch (a pure function of seed, epoch and batch,
so resumed runs see the same ones); validation and test masks are fixed by ``mask_seed`` so
every model is scored on the same holes. The score is PSNR over the missing pixels (the
only ones a model predicts); full-image PSNR, SSIM and the masked MSE come with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from attnlab.data.images import load_digits, load_mnist
from attnlab.data.inpaint import apply_mask, make_masks
from attnlab.files import atomic_path
from attnlab.models.vision import UNetInpainter, ViTInpainter, inpainting_loss
from attnlab.tasks.common import (
    _MODEL_KEYS,
    LazyBatches,
    chunks,
    epoch_order,
    eval_mode,
    transformer_kwargs,
)
from attnlab.train.config import ConfigError
from attnlab.train.metrics import psnr, ssim
from attnlab.train.task import Task, register_task
from attnlab.util.optional import matplotlib_agg

__all__ = ["Inpainting", "InpaintDigits", "InpaintMNIST", "InpaintFashion"]


class Inpainting(Task):
    kind = "inpainting"
    metric = "psnr"
    mode = "max"
    models = ("transformer", "unet")
    count_unit = "images"
    dataset = ""
    options: dict[str, Any] = {"data_dir": None, "download": True, "mask": "box",
                               "box_size": [0.3, 0.5], "patch_fraction": 0.5, "patch_size": 4,
                               "mask_seed": 1234, "n_train": None}
    defaults = {"max_steps": 2000, "batch_size": 64, "lr": 1e-3, "eval_every": 250}

    def load(self):
        raise NotImplementedError

    def setup(self) -> None:
        o = self.opts
        ds = self.load()
        self.dataset_obj = ds
        self.images = {s: x for s, (x, _) in ds.splits.items()}
        if o["n_train"] is not None:
            if not isinstance(o["n_train"], int) or o["n_train"] < 1:
                raise ConfigError(f"task {self.name!r}: n_train must be None or an int >= 1; "
                                  f"got {o['n_train']!r}")
            self.images["train"] = self.images["train"][:o["n_train"]]
        _, c, h, w = self.images["train"].shape
        self.shape = (c, h, w)
        if h % o["patch_size"] or w % o["patch_size"]:
            raise ConfigError(f"task {self.name!r}: patch_size={o['patch_size']} must divide "
                              f"the image size {h}x{w}")
        self.fixed_masks = {s: self._masks(x.shape[0], o["mask_seed"] + i)
                            for i, (s, x) in enumerate(self.images.items()) if s != "train"}
        self._info = {"dataset": ds.name, "source": ds.source, "notes": list(ds.notes),
                      "sizes": {s: int(x.shape[0]) for s, x in self.images.items()},
                      "image": list(self.shape), "mask": o["mask"],
                      "missing_fraction": {s: float(m.float().mean())
                                           for s, m in self.fixed_masks.items()},
                      "manifest": ds.manifest()}
        self.save_json("data.json", self._info)

    def info(self) -> dict[str, Any]:
        return {k: v for k, v in self._info.items() if k != "manifest"}

    def _masks(self, n: int, seed: int) -> torch.Tensor:
        o = self.opts
        _, h, w = self.shape
        return make_masks(n, h, w, kind=o["mask"], box_size=tuple(o["box_size"]),
                          patch_size=o["patch_size"], patch_fraction=o["patch_fraction"],
                          seed=seed)

    def build_model(self):
        cfg = self.config
        c, h, w = self.shape
        if cfg.model == "unet":
            kw = transformer_kwargs(cfg.model_kwargs, ("base_channels", "depth"),
                                    where=f"task {self.name!r} model 'unet'")
            return UNetInpainter(c, **kw)
        # ViTInpainter builds its own blocks: one mechanism for every layer
        kw = transformer_kwargs(cfg.model_kwargs, [k for k in _MODEL_KEYS
                                                   if k != "layer_mechanisms"],
                                where=f"task {self.name!r}")
        return ViTInpainter(h, self.opts["patch_size"], c, mechanism=cfg.mechanism,
                            mechanism_kwargs=cfg.mechanism_kwargs, **kw)

    def train_batches(self, epoch: int):
        x = self.images["train"]
        groups = chunks(epoch_order(x.shape[0], self.config.seed, epoch),
                        self.config.batch_size)

        def make(i: int) -> dict[str, torch.Tensor]:
            g = groups[i]
            # seeds far from the evaluation masks' (mask_seed + split index)
            mask = self._masks(len(g), 10_000_019 * (self.config.seed + 1) + 7919 * epoch + i)
            return {"images": x[g], "mask": mask}

        return LazyBatches(len(groups), make)

    def loss(self, model, batch):
        x, m = batch["images"], batch["mask"]
        pred = model(apply_mask(x, m), m)
        return inpainting_loss(pred.float(), x, m), x.shape[0]

    def predict(self, model, split: str, idx: list[int]) -> tuple[torch.Tensor, ...]:
        device = next(model.parameters()).device
        x, m = self.images[split][idx], self.fixed_masks[split][idx]
        with eval_mode(model):
            pred = model(apply_mask(x, m).to(device), m.to(device)).float().cpu()
        return x, m, pred

    def evaluate(self, model, split, max_batches=None):
        n = self.images[split].shape[0]
        groups = chunks(range(n), 2 * self.config.batch_size)[:max_batches]
        sums = {"psnr": 0.0, "psnr_full": 0.0, "ssim": 0.0, "mse_missing": 0.0}
        count = 0
        for g in groups:
            x, m, pred = self.predict(model, split, g)
            k = len(g)
            sums["psnr"] += float(psnr(pred, x, mask=m)) * k
            sums["psnr_full"] += float(psnr(pred, x)) * k
            sums["ssim"] += float(ssim(pred, x)) * k
            per = ((pred - x) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
            sums["mse_missing"] += float(per.sum())
            count += k
        return {k: v / count for k, v in sums.items()}

    def inpaint_figure(self, model, out: str | Path, *, n: int = 8, split: str = "test"
                       ) -> dict[str, float]:
        """Rows: original, masked input, reconstruction; ``n`` images of ``split``."""
        _, Figure, Canvas = matplotlib_agg("the inpainting figure")
        if split not in self.images:
            raise ConfigError(f"split must be one of {sorted(self.images)}; got {split!r}")
        n = min(n, self.images[split].shape[0])
        x, m, pred = self.predict(model, split, list(range(n)))
        rows = [("original", x), ("masked", apply_mask(x, m)), ("inpainted", pred)]
        fig = Figure(figsize=(1.3 * n, 4.2))
        Canvas(fig)
        axes = fig.subplots(3, n, squeeze=False)
        for r, (label, imgs) in enumerate(rows):
            for i in range(n):
                ax = axes[r][i]
                ax.imshow(imgs[i].permute(1, 2, 0).squeeze(-1).clamp(0, 1), cmap="gray",
                          vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_ylabel(label)
        cfg = self.config
        who = cfg.mechanism if cfg.model == "transformer" else cfg.model
        value = float(psnr(pred, x, mask=m))
        fig.suptitle(f"{self.name}: {who}, PSNR (missing pixels) {value:.2f} dB")
        fig.tight_layout()
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=120, format=out.suffix.lstrip(".").lower() or "png")
        return {"psnr": value}


@register_task
class InpaintDigits(Inpainting):
    """scikit-learn's 8x8 digits: ships with the library, no download."""

    name = "inpaint_digits"
    summary = "Inpaint 8x8 handwritten digits (bundled with scikit-learn, no download)"
    options = {**{k: v for k, v in Inpainting.options.items()
                  if k not in ("data_dir", "download")}, "patch_size": 2}
    defaults = {**Inpainting.defaults, "max_steps": 1500}

    def load(self):
        return load_digits(seed=0)


@register_task
class InpaintMNIST(Inpainting):
    name = "inpaint_mnist"
    summary = "Inpaint 28x28 MNIST digits (idx files; test-only copies are split 7:1:2)"

    def load(self):
        return load_mnist(self.opts["data_dir"], variant="mnist", test_only="split",
                          download=self.opts["download"])


@register_task
class InpaintFashion(Inpainting):
    name = "inpaint_fashion"
    summary = "Inpaint 28x28 Fashion-MNIST images"

    def load(self):
        return load_mnist(self.opts["data_dir"], variant="fashion", test_only="split",
                          download=self.opts["download"])
