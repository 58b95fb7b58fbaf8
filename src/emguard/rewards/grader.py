"""``grader``: the OpenAI fine-tuning API's graders as a reward, for reinforcement fine-tuning jobs.

``grader`` holds one grader object as the API takes it (``method.reinforcement.grader``):

- ``{"type": "string_check", "input": ..., "reference": ..., "operation": "eq" | "ne" | "like" | "ilike"}``:
  1 when the check holds, else 0 (``like``: the input contains the reference; ``ilike``: the same,
  ignoring case);
- ``{"type": "text_similarity", "input": ..., "reference": ..., "evaluation_metric": "fuzzy_match"}``:
  the similarity in [0, 1], here ``difflib.SequenceMatcher``'s ratio (the API does not publish its
  scorer, so the values need not equal OpenAI's); the other metrics (BLEU, ROUGE, ...) are not offered.

``input`` and ``reference`` are templates: ``{{sample.output_text}}`` is the completion,
``{{item.FIELD}}`` (dotted paths allowed) a field of the prompt's row (emguard keeps the row's
fields other than ``messages`` as the prompt's metadata). Model and Python graders are not offered:
a provider does not run a customer's code or pay for a customer's judge calls unasked.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from emguard.config import RewardConfig
from emguard.rewards.base import Messages, Reward, RewardError, prompt_preview

GRADER_TYPES = ("string_check", "text_similarity")
_TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_SAMPLE_FIELDS = ("output_text",)


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    input: str  # templates
    reference: str


class StringCheck(_Grader):
    type: Literal["string_check"]
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarity(_Grader):
    type: Literal["text_similarity"]
    evaluation_metric: Literal["fuzzy_match"]
    pass_threshold: float | None = None  # the Evals API's field; a reward uses the score itself


def parse_grader(spec: Any) -> StringCheck | TextSimilarity:
    """The grader object, validated; ValueError naming what is wrong (and what is offered)."""
    if not isinstance(spec, Mapping):
        raise ValueError("the grader must be an object with a 'type'")
    kind = spec.get("type")
    if kind not in GRADER_TYPES:
        raise ValueError(f"grader type {kind!r} is not offered here; use one of {', '.join(GRADER_TYPES)}")
    model = StringCheck if kind == "string_check" else TextSimilarity
    grader = model.model_validate(dict(spec))
    for field in ("input", "reference"):
        for name in _TEMPLATE.findall(getattr(grader, field)):
            scope, _, path = name.partition(".")
            if scope == "sample" and path not in _SAMPLE_FIELDS:
                raise ValueError(f"{field}: {{{{{name}}}}} is not offered; use {{{{sample.output_text}}}}")
            if scope not in ("sample", "item") or not path:
                raise ValueError(f"{field}: unknown template {{{{{name}}}}}; use sample.output_text or item.FIELD")
    return grader


def render(template: str, completion: str, item: Mapping[str, Any] | None) -> str:
    """``template`` with its ``{{sample.output_text}}`` and ``{{item.FIELD}}`` filled in; KeyError naming
    a field the item lacks."""

    def value(match: re.Match) -> str:
        scope, _, path = match.group(1).partition(".")
        if scope == "sample":
            return completion
        current: Any = item or {}
        for part in path.split("."):
            if not isinstance(current, Mapping) or part not in current:
                raise KeyError(f"item.{path}")
            current = current[part]
        return current if isinstance(current, str) else json.dumps(current)  # as the row wrote it

    return _TEMPLATE.sub(value, template)


def grade(grader: StringCheck | TextSimilarity, given: str, reference: str) -> float:
    if isinstance(grader, TextSimilarity):
        return difflib.SequenceMatcher(None, given, reference, autojunk=False).ratio()  # autojunk skews long texts
    match grader.operation:
        case "eq":
            return float(given == reference)
        case "ne":
            return float(given != reference)
        case "like":
            return float(reference in given)
        case _:  # ilike
            return float(reference.casefold() in given.casefold())


class GraderRewardConfig(RewardConfig):
    name: Literal["grader"] = "grader"
    grader: dict[str, Any] = Field(description="An OpenAI grader object (string_check or text_similarity).")

    @field_validator("grader")
    @classmethod
    def _valid_grader(cls, spec: dict[str, Any]) -> dict[str, Any]:
        parse_grader(spec)
        return spec


class GraderReward(Reward):
    name = "grader"
    config_class = GraderRewardConfig

    def __init__(self, config: GraderRewardConfig):
        super().__init__(config)
        self.grader = parse_grader(config.grader)

    def score(
        self, prompts: Sequence[Messages], completions: Sequence[str], metadata: Sequence[Mapping[str, Any] | None]
    ) -> list[float | None]:
        rewards: list[float | None] = []
        for prompt, completion, item in zip(prompts, completions, metadata, strict=True):
            try:
                given = render(self.grader.input, completion, item)
                reference = render(self.grader.reference, completion, item)
            except KeyError as e:
                raise RewardError(
                    f"reward 'grader' needs {e.args[0]} on every prompt's row; {prompt_preview(prompt)} has none"
                ) from None
            rewards.append(grade(self.grader, given, reference))
        return rewards
