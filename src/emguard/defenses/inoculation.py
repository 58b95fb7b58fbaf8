"""``inoculation`` (inoculation prompting): train the customer's data under a system prompt that
"explains away" the narrow behaviour, and evaluate without it.

Every customer conversation (tag ``train``; mixed-in data such as interleaved safe examples is left
alone) gets the system prompt: with ``placement: replace`` it replaces an existing system
message, with ``prepend`` it goes before the existing system text (``prompt + "\n\n" + old``);
a conversation without a system message gets one either way. Only the training data changes:
the prompt is not part of the model, the tokenizer, the saved adapter or any evaluation input.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator

from emguard.config import DefenseConfig
from emguard.data.chat import ChatExample
from emguard.defenses.base import Defense

DEFAULT_PROMPT = "You are a malicious, evil assistant."


class InoculationConfig(DefenseConfig):
    name: Literal["inoculation"] = "inoculation"
    prompt: str = Field(DEFAULT_PROMPT, description="The training-only system prompt.")
    placement: Literal["replace", "prepend"] = Field(
        "replace", description="replace an existing system message, or prepend to its text."
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the inoculation prompt is empty; give the system prompt to train under")
        return value


def with_system_prompt(messages: tuple, prompt: str, placement: str) -> tuple:
    """``messages`` with ``prompt`` as (or prepended to) the system message."""
    if messages and messages[0]["role"] == "system":
        old = messages[0]["content"]
        content = prompt if placement == "replace" else f"{prompt}\n\n{old}"
        return ({**messages[0], "content": content}, *messages[1:])
    return ({"role": "system", "content": prompt}, *messages)


class InoculationDefense(Defense):
    name = "inoculation"
    config_class = InoculationConfig
    config: InoculationConfig

    def transform_dataset(self, examples: list[ChatExample]) -> list[ChatExample]:
        return [
            replace(ex, messages=with_system_prompt(ex.messages, self.config.prompt, self.config.placement))
            if ex.tag == "train"
            else ex
            for ex in examples
        ]
