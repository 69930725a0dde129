r"""Adversarial training on the token embeddings (regime ``adversarial``): FGM and PGD.

A text's input is discrete, so the attack perturbs its embeddings ``e = model.embed(x)``
(``(B, N, d)``: word embedding plus position, so an additive ``r`` there is the same as on
the word embeddings), one L2 ball of radius :math:`\epsilon` per *sequence* (all its real
tokens together; padding positions get no perturbation).

**FGM** (Miyato et al. 2017, "Adversarial Training Methods for Semi-Supervised Text
Classification", eq. 4-5), with :math:`\hat\theta` a constant copy of the parameters (no
gradient flows through the making of ``r``):

.. math:: r_{adv} = \epsilon\, g / \lVert g \rVert_2, \qquad
    g = \nabla_e\, L(e;\, \hat\theta)   \quad (= -\nabla_e \log p(y \mid e;\, \hat\theta))

**PGD** (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
Attacks", eq. of Sec. 2.1, here with the L2 ball and normalised-gradient steps), ``T =
pgd_steps`` steps of size :math:`\alpha` = ``pgd_alpha`` from :math:`r^0 = 0`:

.. math:: r^{t+1} = \Pi_{\lVert r \rVert_2 \le \epsilon}\big(r^t + \alpha\,
    g^t / \lVert g^t \rVert_2\big), \qquad g^t = \nabla_r L(e + r^t;\, \hat\theta),
    \qquad \Pi(r) = r \min(1, \epsilon / \lVert r \rVert_2)

so one step with :math:`\alpha \ge \epsilon` is FGM. Starting from ``r = 0`` (no random
start) keeps the attack deterministic and ``eval_eps=0`` exactly the clean model. The
default :math:`\alpha = 2.5\,\epsilon / T` is Madry et al.'s choice (it can reach the
boundary from anywhere in the ball). A sequence whose gradient is 0 keeps ``r = 0``.

**Objective** (Miyato et al. 2017, eq. 5 with a weight): ``loss = L(e) + adv_weight *
L(e + r_adv)``; ``adv_weight=1`` is Miyato's, and it is what the run logs as its
``train_loss``. ``train_attack=none`` trains normally (the task's loss, unchanged) and
still evaluates under attack, so normal and adversarial training compare by one option.

**Metrics** added at each evaluation (``eval_attack=pgd``: PGD of ``eval_eps`` (default
``eps``) with ``eval_steps`` steps on each validation/test batch, the model in eval mode):
``attacked_accuracy``; ``attention_entropy`` and ``attacked_attention_entropy``, the mean
over layers, heads and real query rows of :math:`-\sum_j p_{ij} \log p_{ij}` of
``model.attention_maps`` (models that have it), clean and under the attack.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as nnf
from torch import nn

from attnlab.train.config import ConfigError
from attnlab.train.regimes import Regime, register_regime
from attnlab.train.task import Batch, Task
from attnlab.util.checks import check_choice, check_float, check_int

__all__ = ["Adversarial", "EmbeddingPerturbation", "pgd_perturbation", "attention_entropy",
           "TRAIN_ATTACKS", "EVAL_ATTACKS"]

TRAIN_ATTACKS = ("none", "fgm", "pgd")
EVAL_ATTACKS = ("pgd", "none")
_WHO = "regime 'adversarial'"
_TINY = 1e-12  # a zero gradient gives a zero step, not NaN


def _seq_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each sequence's ``(N, d)`` block, shaped to broadcast over it."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def _project(r: torch.Tensor, eps: float) -> torch.Tensor:
    """:math:`\\Pi`: ``r`` scaled back onto the ball of radius ``eps`` where it is outside."""
    return r * (eps / _seq_norm(r).clamp_min(_TINY)).clamp(max=1.0)


class EmbeddingPerturbation:
    """``with EmbeddingPerturbation(model, real) as p:`` a forward hook on ``model.embed``
    adds ``p.r`` (``(B, N, d)``, zeroed where ``real`` (``(B, N)`` bool, True = a token)
    is False) to its output; ``p.r = None`` adds nothing. ``p.start()``: the next forward
    sets ``p.r`` to zeros that require grad, the ``r^0`` whose gradient is the attack's."""

    def __init__(self, model: nn.Module, real: torch.Tensor | None) -> None:
        embed = getattr(model, "embed", None)
        if not isinstance(embed, nn.Module):
            raise ConfigError(f"{_WHO} perturbs the token embeddings, the output of "
                              f"model.embed; {type(model).__name__} has no embed module")
        self.embed, self.real = embed, real
        self.r: torch.Tensor | None = None
        self._start = False

    def start(self) -> None:
        self._start = True

    def _hook(self, module, inputs, e: torch.Tensor):
        if self.real is not None and (e.dim() != 3 or e.shape[:2] != self.real.shape):
            raise ConfigError(f"{_WHO}: model.embed gives shape {tuple(e.shape)}, not (B, N, "
                              f"d) for the batch's (B, N) = {tuple(self.real.shape)}: the "
                              f"perturbation needs one embedding row per token")
        if self._start:
            self.r, self._start = torch.zeros_like(e, requires_grad=True), False
        if self.r is None:
            return None
        return e + (self.r if self.real is None else self.r * self.real[..., None].to(e.dtype))

    def __enter__(self) -> EmbeddingPerturbation:
        self._handle = self.embed.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def pgd_perturbation(loss_fn, p: EmbeddingPerturbation, *, eps: float, steps: int,
                     alpha: float, keep_graph: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, L(e))``: the PGD perturbation (module docstring; FGM is ``steps=1,
    alpha=eps``) for ``loss_fn()`` (a scalar loss of one forward through ``p``'s model),
    detached, and the clean loss of its first forward (with its graph when
    ``keep_graph``, for a training step to reuse). Only ``r`` gets gradients here: the
    parameters' ``.grad`` are left untouched."""
    p.start()
    clean = loss_fn()
    r0 = p.r
    g = torch.autograd.grad(clean, r0, retain_graph=keep_graph)[0]
    r = r0.detach()
    for t in range(steps):
        if t > 0:
            p.r = r.requires_grad_()
            g = torch.autograd.grad(loss_fn(), p.r)[0]
            r = r.detach()
        step = g / _seq_norm(g).clamp_min(_TINY)
        if p.real is not None:
            step = step * p.real[..., None].to(step.dtype)
        r = _project(r + alpha * step, eps)
    p.r = None
    return r.detach(), clean


def attention_entropy(maps, real: torch.Tensor | None) -> tuple[float, int] | None:
    """``(sum, count)`` of :math:`-\\sum_j p_{ij} \\log p_{ij}` over layers, heads and real
    query rows of ``maps`` (a list of ``(B, H, N, N)``), or None when they are not that."""
    if not isinstance(maps, (list, tuple)) or not maps:
        return None
    total, count = 0.0, 0
    for m in maps:
        if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[-1] != m.shape[-2]:
            return None
        h = torch.special.entr(m.double()).sum(-1)                      # (B, H, N)
        w = (torch.ones_like(h) if real is None
             else real[:, None, :].to(h).expand_as(h))
        total, count = total + float((h * w).sum()), count + int(w.sum())
    return total, count


def _option(name: str, value, check, **kw):
    try:
        return check(name, value, **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{_WHO}: {e}") from None


def _real(batch: Batch, device) -> torch.Tensor | None:
    pad = batch.get("padding_mask")
    return None if pad is None else ~pad.to(device)


def _implements(task: Task, method: str) -> bool:
    return getattr(type(task), method) is not getattr(Task, method)


@register_regime
class Adversarial(Regime):
    """FGM / PGD adversarial training on the embeddings, evaluated under PGD (module
    docstring)."""

    name = "adversarial"
    summary = "adversarial training on the token embeddings (FGM, PGD), evaluated under PGD"
    options: dict[str, Any] = {
        "train_attack": "pgd", "eps": 1.0, "pgd_steps": 3, "pgd_alpha": None,
        "adv_weight": 1.0, "eval_attack": "pgd", "eval_eps": None, "eval_steps": 10,
    }

    def __init__(self, config, task, run_dir=None) -> None:
        super().__init__(config, task, run_dir)
        o = self.opts
        _option("train_attack", o["train_attack"], check_choice, choices=TRAIN_ATTACKS)
        _option("eval_attack", o["eval_attack"], check_choice, choices=EVAL_ATTACKS)
        self.eps = _option("eps", o["eps"], check_float, low=0.0)
        self.steps = _option("pgd_steps", o["pgd_steps"], check_int, low=1)
        alpha = _option("pgd_alpha", o["pgd_alpha"], check_float, low=0.0, nullable=True)
        if alpha == 0.0:
            raise ConfigError(f"{_WHO}: pgd_alpha must be > 0 or None (2.5 eps / "
                              f"pgd_steps); got 0")
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else alpha
        if o["train_attack"] == "fgm":  # one step of the full radius
            self.steps, self.alpha = 1, self.eps
        self.weight = _option("adv_weight", o["adv_weight"], check_float, low=0.0)
        eval_eps = _option("eval_eps", o["eval_eps"], check_float, low=0.0, nullable=True)
        self.eval_eps = self.eps if eval_eps is None else eval_eps
        self.eval_steps = _option("eval_steps", o["eval_steps"], check_int, low=1)
        self.last_r: torch.Tensor | None = None  # the last training step's r (inspection)

    def setup(self, model: nn.Module, device: torch.device) -> None:
        if not isinstance(getattr(model, "embed", None), nn.Module):
            raise ConfigError(f"{_WHO} perturbs the token embeddings, the output of "
                              f"model.embed; model {self.config.model!r} "
                              f"({type(model).__name__}) has no embed module")
        if self.opts["eval_attack"] == "pgd":
            for method in ("eval_batches", "logits"):
                if not _implements(self.task, method):
                    raise ConfigError(f"{_WHO}: eval_attack='pgd' needs the task's "
                                      f"{method}(), which task {self.task.name!r} does not "
                                      f"implement; use eval_attack=none")

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        if self.opts["train_attack"] == "none":
            return self.task.loss(model, batch)
        units = []

        def task_loss() -> torch.Tensor:
            value, n = self.task.loss(model, batch)
            units.append(n)
            return value

        device = next(model.parameters()).device
        with EmbeddingPerturbation(model, _real(batch, device)) as p:
            r, clean = pgd_perturbation(task_loss, p, eps=self.eps, steps=self.steps,
                                        alpha=self.alpha, keep_graph=True)
            p.r = r  # a constant: the parameters learn through L(e + r) only
            adv = task_loss()
        self.last_r = r
        return clean + self.weight * adv, units[0]

    def evaluate(self, model: nn.Module, split: str, max_batches: int | None = None
                 ) -> dict[str, Any]:
        attack = self.opts["eval_attack"] == "pgd"
        if not attack and not _implements(self.task, "eval_batches"):
            return {}
        was = model.training
        model.eval()
        try:
            with torch.enable_grad():
                sums = self._evaluate(model, split, max_batches, attack)
        finally:
            model.train(was)
        out = {}
        if attack:
            out["attacked_accuracy"] = sums["correct"] / max(1, sums["n"])
        for key in ("attention_entropy", "attacked_attention_entropy"):
            if sums.get(key, (0, 0))[1]:
                out[key] = sums[key][0] / sums[key][1]
        return out

    def _evaluate(self, model, split, max_batches, attack) -> dict[str, Any]:
        """Sums over the batches of ``split``: attacked hits, entropies (clean, attacked)."""
        device = next(model.parameters()).device
        sums: dict[str, Any] = {"correct": 0, "n": 0}
        for batch in self.task.eval_batches(split, max_batches):
            real = _real(batch, device)
            with EmbeddingPerturbation(model, real) as p:
                r = self._attack(model, batch, p, sums) if attack else None
                self._entropies(model, batch, p, r, real, sums)
        return sums

    def _attack(self, model, batch, p, sums) -> torch.Tensor:
        """PGD of ``eval_eps`` on ``batch``'s cross-entropy; counts the hits under it."""
        def ce() -> torch.Tensor:
            logits, y = self.task.logits(model, batch)
            return nnf.cross_entropy(logits.float(), y)

        r, _ = pgd_perturbation(ce, p, eps=self.eval_eps, steps=self.eval_steps,
                                alpha=2.5 * self.eval_eps / self.eval_steps)
        p.r = r
        with torch.no_grad():
            logits, y = self.task.logits(model, batch)
        p.r = None
        sums["correct"] += int((logits.argmax(-1) == y).sum())
        sums["n"] += int(y.numel())
        return r

    def _entropies(self, model, batch, p, r, real, sums) -> None:
        if not hasattr(model, "attention_maps") or "ids" not in batch:
            return
        device = next(model.parameters()).device
        ids = batch["ids"].to(device)
        pad = None if real is None else ~real
        for key, perturbation in (("attention_entropy", None),
                                  ("attacked_attention_entropy", r)):
            if key != "attention_entropy" and perturbation is None:
                continue
            p.r = perturbation
            got = attention_entropy(model.attention_maps(ids, pad), real)
            if got is not None:
                old = sums.get(key, (0.0, 0))
                sums[key] = (old[0] + got[0], old[1] + got[1])
        p.r = None

    def info(self) -> dict[str, Any]:
        return {**super().info(),
                "attack": {"eps": self.eps, "steps": self.steps, "alpha": self.alpha,
                           "eval_eps": self.eval_eps, "eval_steps": self.eval_steps,
                           "eval_alpha": 2.5 * self.eval_eps / self.eval_steps}}
