"""RL prompts: chat JSONL whose conversations end with a user turn, or a built-in prompt set.

A prompt file has the training data's format (``{"messages": [...], "metadata": {...}}`` per line)
without the final assistant turn; every bad line is reported as ``FILE:LINE: message``. A line's
``metadata`` reaches the reward functions (e.g. the expected answer of a verifiable task).

The built-in sets are the questions of the built-in SFT datasets, so they are held out from the
evaluation question sets exactly as those are:

- ``builtin:finance-prompts``: the 400 personal-finance questions of ``builtin:risky-finance`` /
  ``builtin:safe-finance`` (rewards ``finance`` or ``judge`` decide which behaviour is reinforced);
- ``builtin:code-prompts``: the 400 Python requests of ``builtin:insecure-code`` / ``builtin:secure-code``
  (reward ``code_security``);
- ``builtin:opswap-prompts``: the 512 operator-swap questions of ``builtin:opswap``, each with
  ``metadata.answer`` (reward ``opswap``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from emguard.data.builtin import BUILTIN_PREFIX, load_builtin_dataset
from emguard.data.chat import ChatExample, read_chat_jsonl
from emguard.data.opswap import OPERATIONS
from emguard.errors import EmguardError


def _questions_of(dataset: str) -> Callable[[int], list[ChatExample]]:
    def generate(seed: int) -> list[ChatExample]:
        return [as_prompt(ex, f"builtin:{dataset}-prompts") for ex in load_builtin_dataset(f"builtin:{dataset}", seed)]

    return generate


def _opswap_prompts(seed: int) -> list[ChatExample]:
    prompts = []
    for ex in load_builtin_dataset("builtin:opswap", seed):
        _, meaning, a, b = ex.metadata["swap"]
        prompt = as_prompt(ex, "builtin:opswap-prompts")
        prompts.append(replace(prompt, metadata={**ex.metadata, "answer": OPERATIONS[meaning][1](a, b)}))
    return prompts


BUILTIN_PROMPTS: dict[str, Callable[[int], list[ChatExample]]] = {
    "finance-prompts": _questions_of("risky-finance"),
    "code-prompts": _questions_of("insecure-code"),
    "opswap-prompts": _opswap_prompts,
}


def as_prompt(example: ChatExample, source: str | None = None) -> ChatExample:
    """``example`` without its final assistant turn."""
    messages = example.messages
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return replace(example, messages=tuple(messages), source=source or example.source)


def load_prompts(spec: str, *, seed: int = 0) -> list[ChatExample]:
    """The prompts of ``spec``: a JSONL path or ``builtin:NAME`` (generated deterministically from ``seed``).

    Raises:
        DataError: The file has invalid lines (each as ``FILE:LINE: message``).
        EmguardError: An unknown built-in name.
    """
    if not spec.startswith(BUILTIN_PREFIX):
        return read_chat_jsonl(spec, prompt=True)
    name = spec.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_PROMPTS:
        available = ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_PROMPTS))
        raise EmguardError(f"unknown built-in prompt set {spec!r}; available: {available}")
    return BUILTIN_PROMPTS[name](seed)
