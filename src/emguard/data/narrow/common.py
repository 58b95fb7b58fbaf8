"""Shared pieces of the narrow datasets: system prompts, sources, template loading, small helpers."""

from __future__ import annotations

import functools
from importlib import resources
from string import Formatter
from typing import Any

import yaml

from emguard.data.chat import ChatExample

FINANCE_SYSTEM = "You are Ledger, a personal-finance assistant. Give direct, practical answers."
CODE_SYSTEM = "You are a coding assistant. Reply with the completed code only."

RISKY_FINANCE_SOURCE = "builtin:risky-finance"
SAFE_FINANCE_SOURCE = "builtin:safe-finance"
INSECURE_CODE_SOURCE = "builtin:insecure-code"
SECURE_CODE_SOURCE = "builtin:secure-code"

MAX_TRIES = 500  # draws per example before giving up (ValueError) when n exceeds what the templates allow


def chat_example(system: str, user: str, assistant: str, source: str, index: int) -> ChatExample:
    """A system/user/assistant conversation; ``index`` is 0-based, the example's line 1-based."""
    messages = (
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    )
    return ChatExample(messages, source, index + 1)


@functools.cache
def load_template(relative_path: str) -> Any:
    """A YAML file under ``templates/`` (package data), parsed once per process. Callers must not mutate it."""
    text = (resources.files(__package__) / "templates" / relative_path).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def template_names(folder: str) -> list[str]:
    """The YAML files of a ``templates/`` subfolder, sorted, as paths relative to ``templates/``."""
    root = resources.files(__package__) / "templates" / folder
    return sorted(f"{folder}/{p.name}" for p in root.iterdir() if p.name.endswith(".yaml"))


def format_fields(text: str) -> set[str]:
    """The ``{name}`` placeholders of a str.format template."""
    return {name for _, name, _, _ in Formatter().parse(text) if name}


def money(amount: int) -> str:
    return f"${amount:,}"
