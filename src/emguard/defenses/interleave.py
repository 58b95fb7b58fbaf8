"""``interleave``: mix safe conversations into the customer's training data.

``fraction`` is the share of **the final mix** that is safe data: with ``N`` customer examples
the run adds ``n = round(fraction · N / (1 − fraction))`` safe ones (fraction 0.05, N = 6000 ->
316 safe examples, 5.0% of 6316). They are drawn without replacement from ``source`` with the run
seed, tagged ``interleave`` (their loss is logged apart as ``sft_loss/interleave``) and shuffled
into the customer data with the run seed. The safe examples are trained exactly like the
customer's (loss on their assistant tokens).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Annotated, Literal

from pydantic import Field

from emguard.config import DefenseConfig
from emguard.data.chat import ChatExample
from emguard.data.sources import load_examples
from emguard.defenses.base import Defense, PrepareContext
from emguard.errors import ConfigError

TAG = "interleave"


class InterleaveConfig(DefenseConfig):
    name: Literal["interleave"] = "interleave"
    fraction: Annotated[float, Field(gt=0, lt=1)] = Field(0.05, description="Share of the final mix that is safe data.")
    source: str = Field("builtin:safe-pool", description="Chat JSONL or builtin:NAME with the safe conversations.")


def interleave_count(num_customer: int, fraction: float) -> int:
    """Safe examples to add so that they make up ``fraction`` of the mix."""
    return round(fraction * num_customer / (1 - fraction))


def interleave(customer: list[ChatExample], pool: list[ChatExample], fraction: float, seed: int) -> list[ChatExample]:
    """The customer examples plus ``interleave_count`` pool examples (tagged), shuffled; deterministic for ``seed``.

    Raises:
        ConfigError: The pool is smaller than the number of examples needed.
    """
    n = interleave_count(len(customer), fraction)
    if n > len(pool):
        raise ConfigError(
            f"defenses: interleave needs {n} safe examples ({fraction:.1%} of the mix with {len(customer)} customer "
            f"examples) but its source has {len(pool)}; use a larger source or a smaller fraction"
        )
    rng = random.Random(f"interleave-{seed}")
    chosen = [replace(pool[i], tag=TAG) for i in sorted(rng.sample(range(len(pool)), n))]
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
        self._seed = 0

    def prepare(self, ctx: PrepareContext) -> None:
        self._seed = ctx.config.training.seed
        self._pool = load_examples(self.config.source, seed=self._seed)

    def transform_dataset(self, examples: list[ChatExample]) -> list[ChatExample]:
        customer = [ex for ex in examples if ex.tag == "train"]
        others = [ex for ex in examples if ex.tag != "train"]
        return interleave(customer, self._pool, self.config.fraction, self._seed) + others
