"""Chat JSONL: the OpenAI fine-tuning format, loaded and validated strictly.

One ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line. Every problem in a file is
reported at once as ``FILE:LINE: message`` (up to a cap) and nothing is returned when there is any.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emguard.errors import DataError

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "weight")
# `metadata` is carried through untouched (ids, provenance); anything else is probably a typo.
TOP_LEVEL_KEYS = ("messages", "metadata")
DEFAULT_MAX_PROBLEMS = 50


@dataclass(frozen=True)
class ChatExample:
    """One conversation and where it came from.

    Attributes:
        messages: The turns, each a dict with ``role``, ``content`` and optionally ``weight``
            (0 or 1, assistant turns only: 0 means "context, do not train on this turn").
        source: The file path or ``builtin:NAME`` it was read from.
        line: 1-based line number in ``source`` (or index for generated data).
        tag: Which stream it belongs to: ``train`` for the customer's data; defenses that mix in
            other data give it their own tag (e.g. ``interleave``) so its loss can be logged apart.
        metadata: The record's optional ``metadata`` object, untouched.
    """

    messages: tuple[Mapping[str, Any], ...]
    source: str
    line: int
    tag: str = "train"
    metadata: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}"

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"messages": [dict(m) for m in self.messages]}
        if self.metadata is not None:
            record["metadata"] = dict(self.metadata)
        return record


def record_problems(record: Any, prompt: bool = False) -> list[str]:
    """Everything wrong with one decoded JSONL record (empty list when it is valid).

    ``prompt``: the record is an RL prompt, which ends with a user turn (the policy writes the answer).
    """
    if not isinstance(record, dict):
        return [f"expected a JSON object with a 'messages' list, got {_json_type(record)}"]
    problems = [
        f"unknown key {key!r} (allowed: {', '.join(TOP_LEVEL_KEYS)})" for key in record if key not in TOP_LEVEL_KEYS
    ]
    if "metadata" in record and not isinstance(record["metadata"], dict):
        problems.append(f"'metadata' must be an object, got {_json_type(record['metadata'])}")
    messages = record.get("messages")
    if messages is None:
        return [*problems, "missing 'messages'"]
    if not isinstance(messages, list) or not messages:
        return [*problems, f"'messages' must be a non-empty list, got {_json_type(messages)}"]
    for i, message in enumerate(messages):
        problems.extend(f"messages[{i}]: {p}" for p in _message_problems(message))
    if problems:
        return problems
    return _conversation_problems(messages, prompt)


def _message_problems(message: Any) -> list[str]:
    if not isinstance(message, dict):
        return [f"expected an object with 'role' and 'content', got {_json_type(message)}"]
    problems = [
        f"unknown key {key!r} (allowed: {', '.join(MESSAGE_KEYS)})" for key in message if key not in MESSAGE_KEYS
    ]
    role = message.get("role")
    if role is None:
        problems.append("missing 'role'")
    elif role not in ROLES:
        problems.append(f"unknown role {role!r} (allowed: {', '.join(ROLES)})")
    content = message.get("content")
    if content is None:
        problems.append("missing 'content'")
    elif not isinstance(content, str):
        problems.append(f"'content' must be a string, got {_json_type(content)}")
    elif not content.strip():
        problems.append("empty 'content'")
    if "weight" in message:
        if role != "assistant":
            problems.append("'weight' is only allowed on assistant turns")
        elif message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
            problems.append(f"'weight' must be 0 or 1, got {message['weight']!r}")
    return problems


def _conversation_problems(messages: list[dict], prompt: bool = False) -> list[str]:
    """Turn order: an optional leading system turn, then user/assistant alternating, ending with
    assistant (with a user turn for a ``prompt``).

    Chat templates (Llama 2, Gemma, Mistral) reject other orders, and the assistant-only loss mask
    renders each assistant turn after the prompt that precedes it.
    """
    roles = [m["role"] for m in messages]
    problems = [
        f"messages[{i}]: a system turn is only allowed first" for i, r in enumerate(roles) if r == "system" and i
    ]
    turns = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != "system" and role != expected:
            index = i + (len(roles) - len(turns))
            problems.append(
                f"messages[{index}]: expected a {expected!r} turn here, got {role!r} (turns must alternate)"
            )
            break
    if prompt:
        if roles[-1] != "user":
            problems.append(f"a prompt must end with a user turn (the model writes the answer), not {roles[-1]!r}")
    elif "assistant" not in roles:
        problems.append("no assistant turn: there is nothing to train on")
    elif roles[-1] != "assistant":
        problems.append(f"the conversation must end with an assistant turn, not {roles[-1]!r}")
    elif all(m.get("weight", 1) == 0 for m in messages if m["role"] == "assistant"):
        problems.append("every assistant turn has weight 0: there is nothing to train on")
    return problems


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def content_chars(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(len(m["content"]) for m in messages)


def conversation_key(messages: Sequence[Mapping[str, Any]]) -> str:
    """A stable hash of a conversation's roles and contents (used to find duplicates)."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def read_chat_jsonl(
    path: str | Path,
    *,
    unique: bool = False,
    max_chars: int | None = None,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    prompt: bool = False,
) -> list[ChatExample]:
    """Read and validate a chat JSONL file.

    Args:
        path: The file to read.
        prompt: Read RL prompts: conversations that end with a user turn.
        unique: Treat a conversation that repeats an earlier line as an error.
        max_chars: Reject conversations whose contents exceed this many characters in total.
        max_problems: How many problems to list before summarising the rest as a count.

    Returns:
        The examples, in file order.

    Raises:
        DataError: If any line is invalid; it lists every problem as ``FILE:LINE: message``.
    """
    path = Path(path)
    examples, problems = _scan(path, unique=unique, max_chars=max_chars, prompt=prompt)
    if problems:
        raise DataError(problems[:max_problems], total=len(problems))
    return examples


def check_chat_jsonl(
    path: str | Path, *, unique: bool = False, max_chars: int | None = None, prompt: bool = False
) -> tuple[list[ChatExample], list[str]]:
    """Validate a file without raising: returns (the valid examples, every problem); ``prompt``: RL prompts."""
    return _scan(Path(path), unique=unique, max_chars=max_chars, prompt=prompt)


def _scan(
    path: Path, *, unique: bool, max_chars: int | None, prompt: bool = False
) -> tuple[list[ChatExample], list[str]]:
    if not path.exists():
        return [], [f"{path}: no such file"]
    if path.is_dir():
        return [], [f"{path}: is a directory, expected a .jsonl file"]
    examples: list[ChatExample] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line_problems, record in jsonl_records(path):
        if not line_problems:
            line_problems = record_problems(record, prompt)
        if not line_problems:
            messages = tuple(record["messages"])
            if max_chars is not None and (n := content_chars(messages)) > max_chars:
                line_problems.append(f"conversation is {n} characters long, over the limit of {max_chars}")
            if unique:
                key = conversation_key(messages)
                if key in seen:
                    line_problems.append(f"duplicate of line {seen[key]}")
                else:
                    seen[key] = lineno
        if line_problems:
            problems.extend(f"{path}:{lineno}: {p}" for p in line_problems)
        else:
            examples.append(ChatExample(messages, str(path), lineno, metadata=record.get("metadata")))
    if not examples and not problems:
        problems.append(f"{path}: no examples (the file is empty)")
    return examples, problems


_BLANK = object()


def jsonl_records(path: Path) -> Iterator[tuple[int, list[str], Any]]:
    """(line number, decoding problems, the decoded JSON value or None) per non-blank line: UTF-8
    (a byte-order mark allowed on line 1), one JSON value per line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            problems, record = _decode_line(raw, first=lineno == 1)
            if record is not _BLANK:
                yield lineno, problems, record


def _decode_line(raw: bytes, *, first: bool) -> tuple[list[str], Any]:
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
    raw = raw.rstrip(b"\r\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return [
            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-encode the file as UTF-8"
        ], None
    if not text.strip():
        return [], _BLANK
    try:
        return [], json.loads(text)
    except json.JSONDecodeError as e:
        return [f"invalid JSON: {e.msg} at column {e.colno}"], None


def examples_fingerprint(examples: Iterable[ChatExample]) -> str:
    """sha256 over the conversations (roles, contents, weights) in order: the identity of a dataset."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([dict(m) for m in ex.messages], sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
