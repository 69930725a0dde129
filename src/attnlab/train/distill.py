r"""Attention distillation (regime ``distill``): MiniLM's deep self-attention transfer.

MiniLM (Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
Compression of Pre-Trained Transformers", Sec. 3.1-3.2) trains the student's *last*
self-attention layer ``M`` to mimic the teacher's last layer ``L``, head by head
(:math:`A_h` heads, :math:`|x|` tokens), with two KL divergences:

.. math:: \mathcal{L}_{AT} = \frac{1}{A_h |x|} \sum_{a=1}^{A_h} \sum_{t=1}^{|x|}
    D_{KL}\big(\mathbf{A}^T_{L,a,t} \,\Vert\, \mathbf{A}^S_{M,a,t}\big)

the attention distributions :math:`\mathbf{A}_{a} = \mathrm{softmax}(\mathbf{Q}_a
\mathbf{K}_a^\top / \sqrt{d_k})` (row ``t`` is query ``t``'s), and the *value relation*

.. math:: \mathbf{VR}^T_{L,a} = \mathrm{softmax}\big(\mathbf{V}^T_{L,a}
    {\mathbf{V}^T_{L,a}}^\top / \sqrt{d_k}\big), \qquad
    \mathbf{VR}^S_{M,a} = \mathrm{softmax}\big(\mathbf{V}^S_{M,a}
    {\mathbf{V}^S_{M,a}}^\top / \sqrt{d'_k}\big),

.. math:: \mathcal{L}_{VR} = \frac{1}{A_h |x|} \sum_{a=1}^{A_h} \sum_{t=1}^{|x|}
    D_{KL}\big(\mathbf{VR}^T_{L,a,t} \,\Vert\, \mathbf{VR}^S_{M,a,t}\big)

(``d_k``, ``d'_k``: the teacher's and student's head sizes). Both relations are
``|x| x |x|`` per head, so the hidden sizes may differ but the number of heads of the two
last layers must be the same (MiniLM's requirement), and both models must read the same
token ids: the teacher is fed the student's batches, so :meth:`Distill.setup` refuses a
teacher whose task has another vocabulary, ``max_len`` or CLS token. This is MiniLM's
loss, a KL on distributions, not TinyBERT's (Jiao et al. 2020) MSE on attention scores
of every layer.

**Objective** here, fine-tuning on a task rather than MiniLM's task-agnostic
pre-training: ``loss = L_task + attention_weight * L_AT + value_weight * L_VR`` (the
logged ``train_loss`` is this sum). Padding takes no part: padded keys are excluded from
every distribution (``A``'s are masked by the model, ``VR``'s softmax masks them) and the
average runs over the real query rows of the batch (every head, every real token; a
longer text weighs more, as in MiniLM's per-token mean). A student mechanism that gives
exact zeros where the teacher attends (a window, a sparse pattern) pays
``p log(p / 1e-12)`` there: large, finite. Mechanisms that never form weights go through
:class:`~attnlab.nn.MultiheadAttention`'s effective weights (``out = A v``); one with none
(``fnet``, ``global_filter``) is refused by name.

The teacher (``teacher``: a finished run directory, or a checkpoint file inside one) is
rebuilt by :func:`~attnlab.train.loop.load_trained`, frozen (eval mode, no gradients,
``requires_grad=False``) and kept out of the student's checkpoints: a resumed run loads
it again. Each evaluation adds ``attention_kl`` and ``value_relation_kl`` (the two KLs on
the split, the student in eval mode), so a run without distillation
(``attention_weight=value_weight=0``, which skips the teacher in training) reports how
far its attention is from the teacher's too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnlab.contract import masked_softmax
from attnlab.train.checkpoint import CheckpointError, load_checkpoint
from attnlab.train.config import ConfigError
from attnlab.train.loop import load_trained
from attnlab.train.regimes import Regime, register_regime
from attnlab.train.task import Batch, Task
from attnlab.util.checks import check_float

__all__ = ["Distill", "relation_kl", "value_relation", "minilm_losses", "load_teacher"]

_WHO = "regime 'distill'"
_TINY = 1e-12  # log of a student probability that is exactly 0: large, never inf


def _kl_sums(p_t: torch.Tensor, p_s: torch.Tensor, real: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of :math:`D_{KL}(p_t \\Vert p_s)` over the ``(B, H, N)`` rows of
    two ``(B, H, N, N)`` row distributions, real query rows and real keys only."""
    dt = torch.promote_types(p_s.dtype, torch.float32)
    p_t, p_s = p_t.to(dt), p_s.to(dt)
    terms = torch.xlogy(p_t, p_t) - torch.xlogy(p_t, p_s.clamp_min(_TINY))
    if real is None:
        kl = terms.sum(-1)
        return kl.sum(), torch.tensor(kl.numel(), dtype=dt, device=kl.device)
    kl = torch.where(real[:, None, None, :], terms, 0.0).sum(-1)          # (B, H, N)
    rows = real[:, None, :].expand_as(kl)
    return torch.where(rows, kl, 0.0).sum(), rows.sum().to(dt)


def relation_kl(p_teacher: torch.Tensor, p_student: torch.Tensor,
                real: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM's :math:`\\frac{1}{A_h |x|} \\sum_a \\sum_t D_{KL}(p^T_{a,t} \\Vert p^S_{a,t})`
    for ``(B, H, N, N)`` row distributions; ``real`` ``(B, N)`` (True = a token) keeps the
    real query rows and keys only. Computed in float32 at least."""
    total, count = _kl_sums(p_teacher, p_student, real)
    return total / count.clamp_min(1.0)


def value_relation(v: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`\\mathrm{VR} = \\mathrm{softmax}(V V^\\top / \\sqrt{d_k})` of value heads
    ``(B, H, N, d_k)``, padded keys (``real`` False) masked out: ``(B, H, N, N)``."""
    scores = torch.matmul(v, v.transpose(-2, -1)) / math.sqrt(v.shape[-1])
    return masked_softmax(scores, None if real is None else real[:, None, None, :])


def minilm_losses(teacher: nn.Module, student: nn.Module, ids: torch.Tensor,
                  padding_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_AT, L_VR)`` of ``student`` against ``teacher`` (both with
    ``attention_relations``) on one batch; the teacher runs without gradients, in its
    own mode."""
    real = None if padding_mask is None else ~padding_mask
    with torch.no_grad():
        a_t, v_t = teacher.attention_relations(ids, padding_mask)
    a_s, v_s = student.attention_relations(ids, padding_mask)
    return (relation_kl(a_t, a_s, real),
            relation_kl(value_relation(v_t, real), value_relation(v_s, real), real))


def load_teacher(source: str | Path, device: torch.device) -> tuple[Task, nn.Module]:
    """The teacher's task and model from a finished run directory or a checkpoint file in
    one (its ``best.pt``, ``checkpoint.pt``, ...), frozen on ``device``."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{_WHO}: teacher {path} does not exist (a finished run "
                          f"directory or a checkpoint file in one expected)")
    run_dir = path if path.is_dir() else path.parent
    try:
        task, model = load_trained(run_dir)
        if path.is_file():
            model.load_state_dict(load_checkpoint(path)["model"])
    except (CheckpointError, FileNotFoundError, KeyError) as e:
        raise ConfigError(f"{_WHO}: teacher {path} is not a finished run ({e})") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return task, model


def _same_inputs(student: Task, teacher: Task) -> None:
    """Refuse a teacher that would read the student's ids as other tokens."""
    ts, tt = getattr(student, "tokenizer", None), getattr(teacher, "tokenizer", None)
    if ts is None or tt is None:
        who = "student's" if ts is None else "teacher's"
        raise ConfigError(f"{_WHO}: the {who} task has no tokenizer; both must be text "
                          f"tasks that share one")
    for what, a, b in (("tokenizer kind", tt.kind, ts.kind),
                       ("lowercase", tt.lowercase, ts.lowercase),
                       ("max_len", teacher.opts.get("max_len"), student.opts.get("max_len")),
                       ("CLS token (pooling='cls')", getattr(teacher, "prepend", None),
                        getattr(student, "prepend", None))):
        if a != b:
            raise ConfigError(f"{_WHO}: the teacher's {what} is {a!r}, the student's {b!r}; "
                              f"they must read the same token ids")
    vt, vs = tt.get_vocab(), ts.get_vocab()
    if vt != vs:
        differ = sorted(t for t in set(vt) | set(vs) if vt.get(t) != vs.get(t))
        raise ConfigError(f"{_WHO}: the teacher's tokenizer has another vocabulary map "
                          f"({len(vt)} vs {len(vs)} tokens, {len(differ)} differ, e.g. "
                          f"{differ[:3]}): the student must use the teacher's tokenizer "
                          f"(same data and tokenizer options)")


def _last_attention(model: nn.Module, who: str):
    """The model's last self-attention layer, checked to have attention weights."""
    if not hasattr(model, "attention_relations"):
        raise ConfigError(f"{_WHO}: the {who} model {type(model).__name__} has no "
                          f"attention_relations (the last layer's A and V); use model "
                          f"'transformer'")
    mha = model.last_attention
    if not getattr(mha.attn, "effective_weights", True):
        raise ConfigError(f"{_WHO}: the {who}'s last layer runs mechanism "
                          f"{mha.spec.name!r}, which has no attention weights "
                          f"(returns_weights=False, effective_weights=False: its output is "
                          f"A v for no matrix A); choose another mechanism")
    return mha


@register_regime
class Distill(Regime):
    """MiniLM attention and value-relation distillation from a frozen teacher (module
    docstring)."""

    name = "distill"
    summary = "MiniLM: the last layer's attention and value relations learn a teacher's"
    options: dict[str, Any] = {"teacher": None, "attention_weight": 1.0, "value_weight": 1.0}

    def __init__(self, config, task, run_dir=None) -> None:
        super().__init__(config, task, run_dir)
        teacher = self.opts["teacher"]
        if not isinstance(teacher, str) or not teacher:
            raise ConfigError(f"{_WHO}: option teacher is required: a finished run "
                              f"directory or a checkpoint in one (--regime-opt "
                              f"teacher=PATH); got {teacher!r}")
        self.weights = {}
        for key in ("attention_weight", "value_weight"):
            try:
                self.weights[key] = check_float(key, self.opts[key], low=0.0)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{_WHO}: {e}") from None
        self.teacher: nn.Module | None = None

    def setup(self, model: nn.Module, device: torch.device) -> None:
        mine = _last_attention(model, "student")
        teacher_task, self.teacher = load_teacher(self.opts["teacher"], device)
        theirs = _last_attention(self.teacher, "teacher")
        if mine.num_heads != theirs.num_heads:
            raise ConfigError(f"{_WHO}: the teacher's last layer has num_heads="
                              f"{theirs.num_heads}, the student's {mine.num_heads}: MiniLM "
                              f"transfers head by head, so they must be equal (hidden sizes "
                              f"may differ)")
        _same_inputs(self.task, teacher_task)
        self.teacher_info = {"path": self.opts["teacher"], "task": teacher_task.name,
                             "mechanism": theirs.spec.name, "num_heads": theirs.num_heads,
                             "parameters": sum(p.numel() for p in self.teacher.parameters())}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        task_loss, units = self.task.loss(model, batch)
        wa, wv = self.weights["attention_weight"], self.weights["value_weight"]
        if wa == 0 and wv == 0:  # the baseline: the task's loss, no teacher forward
            return task_loss, units
        l_at, l_vr = minilm_losses(self.teacher, model, batch["ids"],
                                   batch.get("padding_mask"))
        return task_loss + wa * l_at + wv * l_vr, units

    def evaluate(self, model: nn.Module, split: str, max_batches: int | None = None
                 ) -> dict[str, Any]:
        if type(self.task).eval_batches is Task.eval_batches:  # not batch by batch
            return {}
        device = next(model.parameters()).device
        sums = torch.zeros(4, dtype=torch.float64)  # AT sum, count, VR sum, count
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for b in self.task.eval_batches(split, max_batches):
                    ids, pad = b["ids"].to(device), b.get("padding_mask")
                    pad = None if pad is None else pad.to(device)
                    real = None if pad is None else ~pad
                    a_t, v_t = self.teacher.attention_relations(ids, pad)
                    a_s, v_s = model.attention_relations(ids, pad)
                    got = (*_kl_sums(a_t, a_s, real),
                           *_kl_sums(value_relation(v_t, real), value_relation(v_s, real),
                                     real))
                    sums += torch.stack([g.double().cpu() for g in got])
        finally:
            model.train(was)
        return {"attention_kl": float(sums[0] / sums[1].clamp_min(1)),
                "value_relation_kl": float(sums[2] / sums[3].clamp_min(1))}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "teacher": getattr(self, "teacher_info", None)}
