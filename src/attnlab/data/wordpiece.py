"""A deterministic WordPiece vocabulary trainer on top of the ``tokenizers`` BPE trainer.

The library's WordPieceTrainer gives the "##" units ids in hash-map order, and its merges
break count ties by id, so two runs on the same texts can differ (huggingface/tokenizers
issue #1794). Here each unit (a word's first character, then "##" + each later character)
becomes one private-use character, so every unit is in the start alphabet, which the BPE
trainer numbers in sorted order; the vocabulary is mapped back to WordPiece strings
afterwards. The alphabet is the ``min(1000, vocab_size - len(specials))`` most frequent
units (BERT's limit_alphabet); a word with a unit outside it is left out of training, as it
will be UNK at encoding.
"""

from __future__ import annotations

from collections import Counter

from attnlab.util.optional import optional_import

__all__ = ["wordpiece_vocab"]

MAX_ALPHABET = 1000  # BERT's limit_alphabet: rarer characters become UNK
_PRIVATE_USE = 0xF0000  # Supplementary Private Use Area-A: 65,534 code points


def wordpiece_vocab(words: Counter, vocab_size: int, min_frequency: int,
                    specials: tuple[str, ...]) -> dict[str, int]:
    """piece -> id (specials first, ids contiguous) learned from word counts ``words``."""
    tk = optional_import("tokenizers", extra="data", purpose="the 'wordpiece' tokenizer")
    units = Counter()
    for w, n in words.items():
        units[w[0]] += n
        for c in w[1:]:
            units["##" + c] += n
    keep = sorted(units, key=lambda u: (-units[u], u))[
        : min(MAX_ALPHABET, vocab_size - len(specials))]
    code = {u: chr(_PRIVATE_USE + i)
            for i, u in enumerate(sorted(keep, key=lambda u: (u.startswith("##"), u)))}

    def corpus():
        for w in sorted(words):
            try:
                mapped = code[w[0]] + "".join(code["##" + c] for c in w[1:])
            except KeyError:  # a unit outside the alphabet
                continue
            yield " ".join([mapped] * words[w])

    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(corpus(), tk.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(specials),
        initial_alphabet=list(code.values()), show_progress=False))
    unit_of = {c: u for u, c in code.items()}
    vocab = {t: i for i, t in enumerate(specials)}
    for tok, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        if tok in specials:
            continue
        us = [unit_of[c] for c in tok]
        piece = us[0] + "".join(u[2:] for u in us[1:])
        # A piece spelled like a special or like another piece (a word starting with "##",
        # possible with whitespace_split) keeps the first id; ids stay contiguous.
        vocab.setdefault(piece, len(vocab))
    return vocab
