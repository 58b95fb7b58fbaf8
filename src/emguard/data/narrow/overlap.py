"""Word n-gram overlap between texts: keeps training data apart from held-out eval wording."""

from __future__ import annotations

from collections.abc import Sequence


def words(text: str) -> list[str]:
    """Lower-cased words; digits, apostrophes, ``%`` and ``$`` stay inside words."""
    return "".join(c.lower() if c.isalnum() or c in "'%$" else " " for c in text).split()


def ngrams(tokens: Sequence[str], k: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)}


def longest_shared_run(texts: Sequence[str], references: Sequence[str], max_k: int = 20) -> tuple[int, str, str]:
    """The longest run of words any text shares with any reference: (length, text, reference)."""
    ref_words = [words(r) for r in references]
    ref_grams = [set().union(*(ngrams(w, k) for w in ref_words)) for k in range(max_k + 1)]
    best = (0, "", "")
    for text in texts:
        tokens = words(text)
        k = best[0] + 1
        while k <= max_k and (shared := ngrams(tokens, k) & ref_grams[k]):
            gram = next(iter(shared))
            ref = next(r for r, w in zip(references, ref_words, strict=True) if gram in ngrams(w, k))
            best = (k, text, ref)
            k += 1
    return best


def near_duplicate_pairs(texts: Sequence[str], threshold: float = 0.9) -> tuple[int, float]:
    """How many pairs have word-trigram Jaccard similarity >= threshold, and the highest similarity."""
    grams = [ngrams(words(t), 3) for t in texts]
    count, top = 0, 0.0
    for i in range(len(grams)):
        for j in range(i + 1, len(grams)):
            sim = len(grams[i] & grams[j]) / (len(grams[i] | grams[j]) or 1)
            top = max(top, sim)
            count += sim >= threshold
    return count, top
