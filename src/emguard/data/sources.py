"""Resolve a data spec (a JSONL path or ``builtin:NAME``) to validated examples."""

from __future__ import annotations

from emguard.data.builtin import BUILTIN_PREFIX, load_builtin_dataset
from emguard.data.chat import ChatExample, read_chat_jsonl


def load_examples(spec: str, *, seed: int = 0, unique: bool = False) -> list[ChatExample]:
    """Load ``spec``: a chat JSONL path, or ``builtin:NAME`` (generated deterministically from ``seed``).

    Raises:
        DataError: The file has invalid lines (all listed as ``FILE:LINE: message``).
        EmguardError: An unknown built-in name.
    """
    if spec.startswith(BUILTIN_PREFIX):
        return load_builtin_dataset(spec, seed)
    return read_chat_jsonl(spec, unique=unique)
