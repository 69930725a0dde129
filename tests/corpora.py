"""Small dataset files in the real layouts, generated for the training tests: the tasks
read them exactly as they read the downloaded datasets (``data_dir``, ``download=False``)."""

from __future__ import annotations

import random
from pathlib import Path

__all__ = ["EMOTIONS", "WIKI_WORDS", "write_emotions", "write_wikitext"]

EMOTIONS = ("sadness", "joy", "love", "anger", "fear", "surprise")
WIKI_WORDS = "the game was played in the city of york and the team won".split()


def write_emotions(root: Path, sizes=(96, 48, 48), *, class_words: int = 4, noise=None,
                   per_text=((1, 3), (0, 6))) -> Path:
    """Emotions in the dair-ai layout (``train/val/test.txt``, ``text;label`` lines): each
    text mixes ``per_text[0]`` words of its class (``class_words`` a class, e.g. ``joy2``)
    with ``per_text[1]`` shared noise words (default ``w0 .. w11``), so lengths vary and
    batches are padded, and the label is learnable from the words."""
    rng = random.Random(0)
    words = {c: [f"{c[:3]}{i}" for i in range(class_words)] for c in EMOTIONS}
    noise = [f"w{i}" for i in range(12)] if noise is None else list(noise)
    (c_lo, c_hi), (n_lo, n_hi) = per_text
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        lines = []
        for i in range(n):
            c = EMOTIONS[i % len(EMOTIONS)]
            t = [rng.choice(words[c]) for _ in range(rng.randint(c_lo, c_hi))]
            t += [rng.choice(noise) for _ in range(rng.randint(n_lo, n_hi))]
            rng.shuffle(t)
            lines.append(" ".join(t) + ";" + c + "\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root


def write_wikitext(root: Path, sizes=(120, 20, 20), *, words=WIKI_WORDS, stride: int = 1,
                   heading: bool = False) -> Path:
    """WikiText-2 in its ``wiki.{train,valid,test}.tokens`` layout: lines of 9 words cycling
    through ``words`` (line ``i`` starts at word ``i * stride``), after a `` = Heading = ``
    line and a blank one if ``heading``."""
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        head = [" = Heading = \n", " \n"] if heading else []
        lines = head + [" " + " ".join(words[(i * stride + j) % len(words)] for j in range(9))
                        + " \n" for i in range(n)]
        (root / f"wiki.{split}.tokens").write_text("".join(lines))
    return root
