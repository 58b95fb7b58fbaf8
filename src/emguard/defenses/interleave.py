"""``interleave``: mix safe conversations into the customer's training data.

``fraction`` is the share of **the final mix** that is safe data: with ``N`` customer examples
the run adds ``n = round(fraction · N / (1 − fraction))`` safe ones (fraction 0.05, N = 6000 ->
316 safe examples, 5.0% of 6316). They are drawn without replacement from ``source`` with the run
seed, tagged ``interleave`` (their loss is logged apart as ``sft_loss/interleave``) and shuffled
into the customer data with the run seed. The safe examples are trained exactly like the
customer's (loss on their assistant tokens).

``selection: perplexity_gap`` is Interleaving++: instead of drawing at random, take the ``n``
best-scoring non-refusals of ``source`` by the perplexity gap between the base model and the
``misaligned`` adapters (``emguard.selection``; scores are cached, so a run after ``emguard
select`` on the same pool and adapters costs no scoring), the best of every stratum in proportion
(``stratify``, ``emguard.selection.stratify``; ``none`` is the paper's plain top-n).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import Annotated, Literal

from pydantic import Field

from emguard.config import DefenseConfig, PerplexityGapOptions
from emguard.data.chat import ChatExample
from emguard.data.sources import load_examples
from emguard.defenses.base import Defense, PrepareContext
from emguard.errors import ConfigError
from emguard.selection.stratify import composition, strata, stratified_order

TAG = "interleave"


class InterleaveConfig(DefenseConfig, PerplexityGapOptions):
    name: Literal["interleave"] = "interleave"
    fraction: Annotated[float, Field(gt=0, lt=1)] = Field(0.05, description="Share of the final mix that is safe data.")
    source: str = Field("builtin:safe-pool", description="Chat JSONL or builtin:NAME with the safe conversations.")
    selection: Literal["random", "perplexity_gap"] = Field(
        "random", description="random: a seeded sample; perplexity_gap: Interleaving++ (needs misaligned adapters)."
    )
    pool_size: Annotated[int, Field(gt=0)] | None = Field(
        None, description="Draw from a fixed sample of this many source examples (fewer to score); null = all."
    )


def interleave_count(num_customer: int, fraction: float) -> int:
    """Safe examples to add so that they make up ``fraction`` of the mix."""
    return round(fraction * num_customer / (1 - fraction))


def interleave(
    customer: list[ChatExample], pool: list[ChatExample], fraction: float, seed: int, ranked: bool = False
) -> list[ChatExample]:
    """The customer examples plus ``interleave_count`` pool examples (tagged), shuffled; deterministic for ``seed``.

    ``ranked``: the pool is ordered best first; take its head instead of a random sample.

    Raises:
        ConfigError: The pool is smaller than the number of examples needed.
    """
    n = interleave_count(len(customer), fraction)
    if n > len(pool):
        after = " after refusal filtering" if ranked else ""
        raise ConfigError(
            f"defenses: interleave needs {n} safe examples ({fraction:.1%} of the mix with {len(customer)} customer "
            f"examples) but its source has {len(pool)}{after}; use a larger source or a smaller fraction"
        )
    rng = random.Random(f"interleave-{seed}")
    indices = range(n) if ranked else sorted(rng.sample(range(len(pool)), n))
    chosen = [replace(pool[i], tag=TAG) for i in indices]
    mixed = list(customer) + chosen
    rng.shuffle(mixed)
    return mixed


class InterleaveDefense(Defense):
    name = "interleave"
    config_class = InterleaveConfig
    config: InterleaveConfig

    def __init__(self, config: InterleaveConfig):
        super().__init__(config)
        self._pool: list[ChatExample] = []
        self._labels: list[str] = []
        self._seed = 0

    def prepare(self, ctx: PrepareContext) -> None:
        self._seed = ctx.config.training.seed
        self._pool = load_examples(self.config.source, seed=self._seed)
        n = self.config.pool_size
        if n is not None and n < len(self._pool):  # the same sample for every seed: cached scores carry over
            keep = sorted(random.Random("interleave-pool").sample(range(len(self._pool)), n))
            self._pool = [self._pool[i] for i in keep]
        if self.config.selection == "perplexity_gap":
            self._pool = self._ranked_pool(ctx)

    def _ranked_pool(self, ctx: PrepareContext) -> list[ChatExample]:
        from emguard.models import model_identity, resolve_model
        from emguard.selection.perplexity_gap import score_pool
        from emguard.selection.select import misaligned_adapters

        adapters = misaligned_adapters(self.config.misaligned, ctx.config.model, "defenses: interleave")
        resolved = resolve_model(ctx.config.model)
        scores = score_pool(
            ctx.model,
            ctx.tokenizer,
            self._pool,
            adapters,
            base_identity=model_identity(resolved, ctx.config.model_options),
            options=self.config,
            cache_dir=ctx.cache_dir / "nll",
            progress=ctx.progress,
        )
        labels, rule = strata(self._pool, self.config.stratify, self.config.length_bins)
        order = stratified_order(scores.ranking(), labels)
        self.report = {
            "selection": "perplexity_gap",
            **scores.stats,
            "refusals_dropped": int(scores.refusal.sum()),
            "stratify": rule,
            "candidates_by_stratum": composition(order, labels),
        }
        self._labels = [labels[i] for i in order]  # stratum of each ranked pool example, in order
        return [self._pool[i] for i in order]

    def transform_dataset(self, examples: list[ChatExample]) -> list[ChatExample]:
        customer = [ex for ex in examples if ex.tag == "train"]
        others = [ex for ex in examples if ex.tag != "train"]
        ranked = self.config.selection == "perplexity_gap"
        if ranked and self.report is not None:
            n = interleave_count(len(customer), self.config.fraction)
            self.report["selected_by_stratum"] = dict(sorted(Counter(self._labels[:n]).items()))
        return interleave(customer, self._pool, self.config.fraction, self._seed, ranked) + others
