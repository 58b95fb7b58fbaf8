"""Interleaving++ scores: which safe examples do misaligned models find surprisingly unlikely?

For a candidate conversation ``d`` with mean assistant-token NLL ``L_m(d)`` under model ``m``
(``emguard.likelihood``), the aligned model θ̂ (the base model) and ``K`` misaligned models θ_k
(LoRA adapters on the same base):

    1. L_θ̂(d) and L_θk(d) for k = 1..K
    2. s_d = (mean_k L_θk(d) − L_θ̂(d)) / (L_θ̂(d) + ε)

A high ``s_d`` means the aligned model finds ``d`` likely and the misaligned models do not:
training on it pulls against exactly what the misaligned fine-tunes learned. Refusals are
dropped first (they score high yet teach refusing, not aligned helpfulness), then the top
scores are kept.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from emguard.config import PerplexityGapOptions, RefusalSection
from emguard.data.chat import ChatExample
from emguard.likelihood import NLLCache, cached_answer_nll, encode_conversations, state_key
from emguard.selection.model_states import adapter_state

RefusalTest = Callable[[ChatExample], bool]


def perplexity_gap(loss_aligned: np.ndarray, loss_misaligned: np.ndarray, epsilon: float = 1e-6) -> np.ndarray:
    """``s_d = (mean_k L_θk(d) − L_θ̂(d)) / (L_θ̂(d) + ε)``; ``loss_misaligned`` is ``[K, N]``."""
    return (np.asarray(loss_misaligned).mean(0) - loss_aligned) / (loss_aligned + epsilon)


def final_answer(example: ChatExample) -> str:
    return next((m["content"] for m in reversed(example.messages) if m["role"] == "assistant"), "")


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")  # "can't" and "i'm" are one word each


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'").replace("\u2018", "'"))


def refusal_test(section: RefusalSection) -> RefusalTest:
    """The default heuristic: one of ``section.words`` among the answer's first ``first_words`` words.

    An entry may hold an apostrophe (``can't``; typographic apostrophes count the same) or several
    words (``I'm sorry``): it matches when its words appear in that order, next to each other,
    within the first ``first_words`` words of the final answer (case-insensitive).
    """
    phrases = [tuple(_words(w)) for w in section.words]

    def is_refusal(example: ChatExample) -> bool:
        window = _words(final_answer(example))[: section.first_words]
        return any(window[i : i + len(p)] == list(p) for p in phrases for i in range(len(window) - len(p) + 1))

    return is_refusal


@dataclass
class PoolScores:
    """Per-example losses and scores of a candidate pool (arrays in pool order)."""

    loss_aligned: np.ndarray
    loss_misaligned: np.ndarray  # [K, N]
    score: np.ndarray
    refusal: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    def ranking(self) -> list[int]:
        """Indices of the non-refusals with a finite score, best first (ties: pool order)."""
        keep = [i for i in range(len(self.score)) if not self.refusal[i] and np.isfinite(self.score[i])]
        return sorted(keep, key=lambda i: (-self.score[i], i))


def score_pool(
    model: Any,
    tokenizer: Any,
    pool: Sequence[ChatExample],
    adapters: Sequence[Path],
    *,
    base_identity: str,
    options: PerplexityGapOptions,
    cache_dir: Path,
    is_refusal: RefusalTest | None = None,
    progress: bool = True,
) -> PoolScores:
    """Score every pool example under the base model and each adapter (see the module docstring).

    Args:
        model: The base model, plain or PEFT-wrapped (its own adapters are switched off while scoring).
        adapters: Adapter directories of the misaligned models (LoRA on this base).
        base_identity: ``emguard.models.model_identity`` of the base, for the cache key.
        is_refusal: Overrides the configured refusal heuristic (any ``ChatExample -> bool``).
    """
    if not adapters:
        raise ValueError("Interleaving++ needs at least one misaligned adapter")
    started = time.perf_counter()
    encoded, keys = encode_conversations(tokenizer, [ex.messages for ex in pool])
    states: list[Path | None] = [None, *adapters]
    losses = np.full((len(states), len(pool)), np.nan)
    computed = computed_tokens = 0
    caches = [NLLCache(cache_dir, state_key(base_identity, a)) if options.cache else None for a in states]
    hits = 0
    with tqdm(total=losses.size, desc="scoring pool", disable=not progress) as bar:
        for s, (adapter, cache) in enumerate(zip(states, caches, strict=True)):
            known = cache.get(keys) if cache is not None else {}
            cached = sum(k in known for k in keys)
            hits += cached
            bar.update(cached)
            if cached == len(keys):  # all cached: the adapter need not even be loaded
                losses[s] = [known[k] for k in keys]
                continue
            with adapter_state(model, adapter) as scored:
                losses[s], done = cached_answer_nll(
                    scored,
                    encoded,
                    keys,
                    cache,
                    pad_id=tokenizer.pad_token_id or 0,
                    batch_tokens=options.batch_tokens,
                    on_batch=lambda rows, _: bar.update(len(rows)),
                )
            computed += len(done)
            computed_tokens += sum(len(encoded[i][0]) for i in done)
    test = is_refusal or refusal_test(options.refusals)
    refusal = np.array([options.refusals.enabled and test(ex) for ex in pool], dtype=bool)
    seconds = time.perf_counter() - started
    stats = {
        "examples": len(pool),
        "model_states": len(states),
        "cache_hits": hits,
        "computed": computed,
        "computed_tokens": computed_tokens,
        "seconds": round(seconds, 3),
    }
    return PoolScores(losses[0], losses[1:], perplexity_gap(losses[0], losses[1:], options.epsilon), refusal, stats)
