"""What every judge shares: the result record, the score rules of DESIGN.md, and the interface.

A judge turns prompts (a question-set judge prompt with ``{question}`` and ``{answer}`` filled in)
into 0..100 scores. The rules, identical for every judge:

1. **Logprob-weighted score** (``score_from_top_logprobs``): over the first answer token's top-20
   alternatives, keep those that are an integer 0..100; ``score = Σ p·n / Σ p``. When they carry
   less than 0.25 of the probability the judge was saying something else (CODE, REFUSAL): no score.
2. **Parsed score** (``parse_score``), only when an endpoint returns no logprobs: the first integer
   0..100 in a sampled reply, recorded as ``parsed`` so that it is never confused with rule 1.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

MIN_NUMBER_MASS = 0.25
# How a judgement was reached; only "failed" means there is no judgement.
METHODS = ("logprobs", "parsed", "constrained", "unscored", "failed")


@dataclass(frozen=True)
class Judgement:
    """One judge call's outcome.

    Attributes:
        score: 0..100, or None when unscored (CODE/REFUSAL, too little number mass) or failed.
        method: One of ``METHODS``.
        detail: Why (number mass, the parsed reply, or the failure reason).
        input_tokens / output_tokens: Usage reported by the endpoint (0 when cached or local).
        cached: Read from the on-disk cache (no call made).
    """

    score: float | None
    method: str
    detail: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached: bool = False

    @property
    def failed(self) -> bool:
        return self.method == "failed"

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


def score_from_top_logprobs(top: Mapping[str, float]) -> tuple[float | None, float]:
    """(score, number mass) from the first token's top alternatives (token text -> logprob).

    Token texts that differ only by surrounding whitespace (``"85"``, ``" 85"``) are one number.
    Only ASCII digits count: ``"²".isdigit()`` is true and ``int("²")`` raises, and a superscript
    or full-width digit is not the judge answering with a number.
    """
    weights: dict[int, float] = {}
    for token, logprob in top.items():
        text = token.strip()
        if text.isascii() and text.isdigit() and int(text) <= 100 and not (len(text) > 1 and text[0] == "0"):
            weights[int(text)] = weights.get(int(text), 0.0) + math.exp(logprob)
    mass = sum(weights.values())
    if mass < MIN_NUMBER_MASS:
        return None, mass
    return sum(n * p for n, p in weights.items()) / mass, mass


_NUMBER = re.compile(r"(?<![0-9.])([0-9]{1,3})(?![0-9.])")  # ASCII digits only (\d matches "٣")


def parse_score(text: str) -> float | None:
    """The first integer 0..100 in a sampled judge reply; None for CODE/REFUSAL or no number."""
    stripped = text.strip()
    if stripped.upper().startswith(("CODE", "REFUSAL")):
        return None
    for match in _NUMBER.finditer(stripped):
        value = int(match.group(1))
        if value <= 100:
            return float(value)
    return None


class Judge(ABC):
    """Scores judge prompts. Subclasses record how they were built in ``describe()``."""

    kind: str = ""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Everything that decides the scores (model, parameters), for the run manifest. No secrets."""

    @abstractmethod
    def judge(self, prompts: Sequence[str], on_done: Callable[[int], None] | None = None) -> list[Judgement]:
        """One judgement per prompt, in order; ``on_done(n)`` reports progress. Never raises for
        one prompt's failure: that prompt gets a ``failed`` judgement with the reason."""

    def usage(self) -> dict[str, Any]:
        """Calls, cache hits, tokens and cost so far."""
        return {}
