"""Stratified Interleaving++ selection: the best-scoring examples of every kind, not of one kind.

The relative gap ``s_d = (mean_k L_θk(d) − L_θ̂(d)) / (L_θ̂(d) + ε)`` divides by the aligned model's
loss, which is near zero for short, templated answers ("The capital of Peru is Lima."); a plain
top-k then takes almost only those (on the built-in pool: all capitals, spelling and arithmetic,
none of the advice or explanations that resemble the customer's data). Stratified selection keeps
the score *within* each stratum but gives every stratum its share of the selection:

1. Label each candidate: its ``family`` (``metadata.family``, which the built-in pool has), or
   its answer-length quantile bin (``length_bins`` bins), or one label for all (``none``: the
   paper's plain top-k).
2. Order the candidates so that every prefix is split across strata in proportion to their sizes
   among the candidates: repeatedly take the best remaining candidate of the stratum furthest
   below its share (ties: the better-ranked candidate). A selection of any size is the head of
   this order, so ``interleave`` and ``emguard select`` cut it wherever they need.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emguard.config import StratifyRule
from emguard.data.chat import ChatExample
from emguard.errors import ConfigError


def final_answer_length(example: ChatExample) -> int:
    return len(next((m["content"] for m in reversed(example.messages) if m["role"] == "assistant"), ""))


def strata(examples: Sequence[ChatExample], how: StratifyRule, length_bins: int = 4) -> tuple[list[str], str]:
    """A stratum label per example and the rule used (``auto`` resolves to ``family`` or ``length``).

    Raises:
        ConfigError: ``family`` asked for but some example has no ``metadata.family``.
    """
    families = [(ex.metadata or {}).get("family") for ex in examples]
    if how == "auto":
        how = "family" if examples and all(isinstance(f, str) and f for f in families) else "length"
    if how == "none":
        return ["all"] * len(examples), how
    if how == "family":
        missing = [ex.location for ex, f in zip(examples, families, strict=True) if not f]
        if missing:
            raise ConfigError(
                f"stratify: family needs metadata.family on every pool example; {len(missing)} have none "
                f"(first: {missing[0]}); use stratify: length"
            )
        return [str(f) for f in families], how
    lengths = np.array([final_answer_length(ex) for ex in examples], dtype=float)
    edges = np.quantile(lengths, np.linspace(0, 1, length_bins + 1)[1:-1]) if len(lengths) else []
    return [f"length-q{int(np.searchsorted(edges, x, side='right')) + 1}" for x in lengths], how


def stratified_order(ranking: Sequence[int], labels: Sequence[str]) -> list[int]:
    """``ranking`` (indices, best first) reordered so that every prefix is proportional to the strata.

    ``labels[i]`` is the stratum of index ``i``; each stratum's share is its size among ``ranking``.
    """
    queues: dict[str, list[int]] = {}
    for i in ranking:
        queues.setdefault(labels[i], []).append(i)
    position = {i: r for r, i in enumerate(ranking)}
    taken = dict.fromkeys(queues, 0)
    order: list[int] = []
    n = len(ranking)
    for k in range(1, n + 1):
        open_strata = [s for s in queues if taken[s] < len(queues[s])]
        # The deficit k·share − taken, times n to stay in integers (exact ties go to the better rank).
        best = max(open_strata, key=lambda s: (k * len(queues[s]) - taken[s] * n, -position[queues[s][taken[s]]]))
        order.append(queues[best][taken[best]])
        taken[best] += 1
    return order


def composition(chosen: Sequence[int], labels: Sequence[str]) -> dict[str, int]:
    """How many of ``chosen`` each stratum holds (for reports)."""
    counts: dict[str, int] = {}
    for i in chosen:
        counts[labels[i]] = counts.get(labels[i], 0) + 1
    return dict(sorted(counts.items()))
