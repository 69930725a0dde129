"""Metrics of generated text against references: BLEU, chrF (sacreBLEU) and ROUGE-L.

* BLEU (Papineni et al. 2002): corpus-level, ``BP * exp(sum_n 1/4 log p_n)`` over the
  clipped n-gram precisions ``p_1..p_4`` of all hypotheses together, brevity penalty
  ``BP = min(1, exp(1 - r / c))`` (``r``, ``c``: reference and hypothesis lengths in
  tokens). sacreBLEU's ``corpus_bleu`` with its defaults (13a tokenizer, exp smoothing),
  so the figures are comparable with published ones; 0..100.
* chrF (Popovic 2015): the character n-gram F-score, ``chrF_beta = (1 + beta^2) chrP chrR /
  (beta^2 chrP + chrR)``, n = 1..6, beta = 2, corpus-level; sacreBLEU's ``corpus_chrf``;
  0..100. Credits half-right words, which BLEU scores as wrong (a German compound).
* ROUGE-L (Lin 2004): per pair, the longest common subsequence of tokens, ``P = LCS / |hyp|``,
  ``R = LCS / |ref|``, ``F = 2PR / (P + R)``; the mean F over pairs (Google's
  ``rouge-score``), 0..1. Tokens are lowercased runs of Unicode letters and digits: the
  package's default tokenizer keeps only ASCII ``a-z0-9`` and would cut ``"dreißig"`` in two.

Every function takes two equally long lists of strings (one hypothesis per reference).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from attnlab.util.optional import optional_import

__all__ = ["bleu", "chrf", "rouge_l", "text_scores"]

_WORD = re.compile(r"\w+")  # \w is Unicode-aware for str patterns


def _check(hypotheses: Sequence[str], references: Sequence[str], who: str) -> None:
    for name, seq in (("hypotheses", hypotheses), ("references", references)):
        if isinstance(seq, str) or not isinstance(seq, Sequence):
            raise TypeError(f"{who}: {name} must be a list of str; got {type(seq).__name__}")
        bad = next((i for i, s in enumerate(seq) if not isinstance(s, str)), None)
        if bad is not None:
            raise TypeError(f"{who}: {name}[{bad}] must be a str; got "
                            f"{type(seq[bad]).__name__} {seq[bad]!r}")
    if len(hypotheses) != len(references):
        raise ValueError(f"{who}: hypotheses and references must be as many; got "
                         f"{len(hypotheses)} hypotheses and {len(references)} references")
    if not references:
        raise ValueError(f"{who}: needs at least one hypothesis/reference pair; got none")


def _sacrebleu():
    return optional_import("sacrebleu", extra="translation", purpose="BLEU and chrF")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0..100) of ``hypotheses`` against one reference each."""
    _check(hypotheses, references, "bleu")
    return float(_sacrebleu().corpus_bleu(list(hypotheses), [list(references)]).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0..100, beta = 2, character 6-grams) against one reference each."""
    _check(hypotheses, references, "chrf")
    return float(_sacrebleu().corpus_chrf(list(hypotheses), [list(references)]).score)


class _UnicodeWords:
    """rouge-score's tokenizer interface (``tokenize(text) -> list[str]``)."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (0..1) over the pairs."""
    _check(hypotheses, references, "rouge_l")
    rouge_scorer = optional_import("rouge_score.rouge_scorer", extra="translation",
                                   dist="rouge-score", purpose="ROUGE-L")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())
    scores = [scorer.score(r, h)["rougeL"].fmeasure  # score(target, prediction)
              for h, r in zip(hypotheses, references, strict=True)]
    return sum(scores) / len(scores)


def text_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"bleu", "chrf", "rougeL", "exact"}``; ``exact`` is the fraction of hypotheses
    equal to their reference (whitespace at the ends ignored)."""
    _check(hypotheses, references, "text_scores")
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
    return {"bleu": bleu(hypotheses, references), "chrf": chrf(hypotheses, references),
            "rougeL": rouge_l(hypotheses, references), "exact": exact / len(references)}
