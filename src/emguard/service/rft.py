"""Reinforcement fine-tuning jobs (``method.type: reinforcement``): the API's RFT data and grader on
emguard's GRPO (``training.method: grpo`` with the ``grader`` reward).

An RFT training file holds prompts: one JSON object per line with ``messages`` ending in a user turn
and any other fields, which the grader reads as ``{{item.FIELD}}``. emguard keeps those fields as
the prompt's ``metadata`` (``prompt_record``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from emguard.data.chat import record_problems
from emguard.fsio import atomic_write_text
from emguard.rewards.grader import parse_grader
from emguard.service.runconfig import HyperparameterError, check_hyperparameters

# The API's RFT hyperparameters emguard maps (the rest are accepted as "auto" only).
AUTO_ONLY = ("compute_multiplier", "eval_interval", "eval_samples", "reasoning_effort")


class MethodError(ValueError):
    """A job's ``method`` is invalid; ``param`` names the field as the API does."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _records(path: Path):
    """(line number, decoded JSON or None when the line is not JSON) per non-blank line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield lineno, None


def is_prompt_file(path: Path) -> bool:
    """Whether the file's first record ends with a user turn (RFT prompts) rather than an answer (SFT)."""
    for _, record in _records(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        return bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "user"
    return False


def prompt_record(record: dict[str, Any]) -> dict[str, Any]:
    """An RFT row as an emguard prompt: its fields other than ``messages`` become the metadata."""
    item = {k: v for k, v in record.items() if k != "messages"}
    return {"messages": record.get("messages"), **({"metadata": item} if item else {})}


def check_prompt_file(
    path: Path, display_name: str, max_examples: int, max_problems: int = 20
) -> tuple[int, list[str]]:
    """(valid prompts, ``NAME:LINE: problem`` for each bad line) of an RFT training file."""
    count, problems = 0, []
    for lineno, record in _records(path):
        if not isinstance(record, dict):
            line = ["not a JSON object" if record is not None else "not valid JSON"]
        else:
            line = record_problems(prompt_record(record), prompt=True)
        problems += [f"{display_name}:{lineno}: {p}" for p in line]
        count += not line
    if len(problems) > max_problems:
        problems = [*problems[:max_problems], f"... and {len(problems) - max_problems} more problems"]
    if not problems and not count:
        problems = [f"{display_name}: no prompts (one JSON object with 'messages' per line)"]
    if count > max_examples:
        problems.append(f"{display_name}: {count} prompts, over this service's limit of {max_examples}")
    return count, problems


def write_prompt_file(source: Path, out: Path) -> None:
    """The job's RFT file as emguard prompt JSONL (``check_prompt_file`` has passed on it)."""
    lines = [json.dumps(prompt_record(record)) for _, record in _records(source)]
    atomic_write_text(out, "\n".join(lines) + "\n")


def check_reinforcement(method: dict[str, Any], max_epochs: int) -> dict[str, Any]:
    """``method`` of a reinforcement job, validated and normalised (hyperparameters "auto" where not given)."""
    section = method.get("reinforcement")
    if not isinstance(section, dict) or "grader" not in section:
        raise MethodError("method.reinforcement.grader", "method.reinforcement needs a grader")
    unknown = sorted(set(section) - {"grader", "hyperparameters", "response_format"})
    if unknown:
        raise MethodError(f"method.reinforcement.{unknown[0]}", f"unknown field {unknown[0]!r}")
    if section.get("response_format") is not None:
        raise MethodError("method.reinforcement.response_format", "response_format is not offered here")
    try:
        grader = parse_grader(section["grader"]).model_dump(exclude_none=True)
    except (ValueError, ValidationError) as e:
        raise MethodError("method.reinforcement.grader", f"invalid grader: {_first_error(e)}") from None
    values = dict(section.get("hyperparameters") or {})
    for name in AUTO_ONLY:
        if values.pop(name, "auto") != "auto":
            raise MethodError(f"hyperparameters.{name}", f"{name} is not offered here; leave it 'auto'")
    try:
        hp = check_hyperparameters(values, max_epochs)
    except HyperparameterError as e:
        raise MethodError(f"hyperparameters.{e.param}", str(e)) from None
    return {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp}}


def _first_error(e: ValueError | ValidationError) -> str:
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return str(e)
