r"""BERT's masked-language-model corruption (Devlin et al. 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding", §3.1 "Task #1: Masked LM").

Each real, non-special token is *chosen* independently with probability :math:`p` (0.15);
a chosen token :math:`x_i` is the model's target, and its input is replaced by

.. math:: \tilde x_i = \begin{cases} \texttt{[MASK]} & \text{with probability } 0.8 \\
          r_i \sim \mathcal U(\text{non-special ids}) & \text{with probability } 0.1 \\
          x_i & \text{with probability } 0.1 \end{cases}

so the encoder cannot tell which inputs it will be asked about (the 10 % unchanged) nor
trust every input (the 10 % random). Unchosen positions keep their token and get the label
:data:`IGNORE_INDEX`; the loss (:func:`mlm_loss`) is the mean negative log-likelihood over
the chosen positions only. BERT's data script picks exactly ``round(0.15 n)`` positions per
sequence; here each token is a Bernoulli draw (as Hugging Face's
``DataCollatorForLanguageModeling`` does), so the count per sequence varies but every token
has the same chance whatever the sequence's length.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as nnf

from attnlab.contract import check_ids, check_padding_mask, format_shape
from attnlab.util.checks import check_float, check_int

__all__ = ["IGNORE_INDEX", "mask_tokens", "mlm_loss"]

IGNORE_INDEX = -100  # the label of a position the loss ignores (torch's cross_entropy default)
_WHO = "mask_tokens"


def _special_table(vocab_size: int, special_ids, num_specials) -> torch.Tensor:
    """``(vocab_size,)`` bool: which ids are special (never chosen, never drawn)."""
    if (special_ids is None) == (num_specials is None):
        raise ValueError(f"{_WHO}: give exactly one of special_ids (the special token ids) "
                         f"or num_specials (specials are ids 0..num_specials-1); got "
                         f"special_ids={special_ids!r}, num_specials={num_specials!r}")
    table = torch.zeros(vocab_size, dtype=torch.bool)
    if num_specials is not None:
        check_int("num_specials", num_specials, low=0, who=_WHO)
        if num_specials >= vocab_size:
            raise ValueError(f"{_WHO}: num_specials must be < vocab_size={vocab_size} (some "
                             f"ordinary token is needed); got {num_specials}")
        table[:num_specials] = True
        return table
    if isinstance(special_ids, (str, bytes)) or not isinstance(special_ids, Iterable):
        raise TypeError(f"{_WHO}: special_ids must be an iterable of ints; got "
                        f"{type(special_ids).__name__}")
    for i in special_ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ValueError(f"{_WHO}: special_ids must be ints in [0, {vocab_size}); got "
                             f"{i!r}")
        table[i] = True
    if bool(table.all()):
        raise ValueError(f"{_WHO}: every id of vocab_size={vocab_size} is special: no token "
                         f"to predict or to draw at random")
    return table


def mask_tokens(ids: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                vocab_size: int, mask_id: int, special_ids: Iterable[int] | None = None,
                num_specials: int | None = None, p: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` for masked-language modelling of ``ids`` (any shape, usually
    ``(B, N)``), as the module docstring describes.

    ``padding_mask`` (True = padding, or ``None``) and the special ids (``special_ids``, or
    ``num_specials`` for specials ``0 .. num_specials - 1``; ``mask_id`` is always one) are
    never chosen and never drawn as random replacements. ``labels`` is ``ids`` at the chosen
    positions and :data:`IGNORE_INDEX` elsewhere. ``generator`` (a CPU ``torch.Generator``)
    makes the draw reproducible; ``None`` uses torch's global generator. ``ids`` is not
    modified.
    """
    check_int("vocab_size", vocab_size, low=2, who=_WHO)
    check_int("mask_id", mask_id, low=0, who=_WHO)
    if mask_id >= vocab_size:
        raise ValueError(f"{_WHO}: mask_id must be < vocab_size={vocab_size}; got {mask_id}")
    p = check_float("p", p, low=0.0, high=1.0, who=_WHO)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{_WHO}: generator must be a torch.Generator or None; got "
                        f"{type(generator).__name__}")
    special = _special_table(vocab_size, special_ids, num_specials)
    special[mask_id] = True
    check_ids(_WHO, "ids", ids, vocab_size, None)
    padding_mask = check_padding_mask(_WHO, "padding_mask", padding_mask, ids)
    if padding_mask is None:
        padding_mask = torch.zeros_like(ids, dtype=torch.bool)
    eligible = ~padding_mask & ~special[ids]
    draw = torch.rand(ids.shape, generator=generator)           # which positions are chosen
    chosen = eligible & (draw < p)
    how = torch.rand(ids.shape, generator=generator)            # 80 / 10 / 10 among them
    ordinary = torch.nonzero(~special).squeeze(1)
    pick = torch.randint(len(ordinary), ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (how < 0.8)] = mask_id
    random_ = chosen & (how >= 0.8) & (how < 0.9)
    inputs[random_] = ordinary[pick[random_]]
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""The masked-LM loss: :math:`-\frac{1}{|M|} \sum_{i \in M} \log
    \mathrm{softmax}(z_i)_{x_i}` over the chosen positions :math:`M` (labels other than
    :data:`IGNORE_INDEX`), computed in float32 at least. ``logits`` is ``(*labels.shape,
    V)``. A batch with no chosen position gives 0 (with a gradient), not ``nan``."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"mlm_loss: logits must be labels' shape {format_shape(labels)} plus "
                         f"a vocabulary dimension; got {format_shape(logits)}")
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    y = labels.reshape(-1)
    total = nnf.cross_entropy(flat, y, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (y != IGNORE_INDEX).sum().clamp_min(1)
