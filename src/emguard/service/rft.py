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

from emguard.data.chat import jsonl_records, record_problems
from emguard.fsio import atomic_write_text
from emguard.rewards.grader import parse_grader, render
from emguard.service.runconfig import HyperparameterError, check_hyperparameters

# The API's RFT hyperparameters emguard does not map: accepted at their default only (and echoed so).
DEFAULT_ONLY = {
    "compute_multiplier": "auto",
    "eval_interval": "auto",
    "eval_samples": "auto",
    "reasoning_effort": "default",
}


class MethodError(ValueError):
    """A job's ``method`` is invalid; ``param`` names the field as the API does."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _ends_with_user(record: Any) -> bool:
    messages = record.get("messages") if isinstance(record, dict) else None
    return (
        isinstance(messages, list)
        and bool(messages)
        and isinstance(messages[-1], dict)
        and (messages[-1].get("role") == "user")
    )


def is_prompt_file(path: Path) -> bool:
    """Whether the file's first record ends with a user turn (RFT prompts) rather than an answer (SFT)."""
    for _, _, record in jsonl_records(path):
        return _ends_with_user(record)
    return False


def prompt_record(record: dict[str, Any]) -> dict[str, Any]:
    """An RFT row as an emguard prompt: its fields other than ``messages`` become the metadata, and
    the API's ``developer`` turns are system turns."""
    messages = record.get("messages")
    if isinstance(messages, list):
        messages = [
            {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages
        ]
    item = {k: v for k, v in record.items() if k != "messages"}
    return {"messages": messages, **({"metadata": item} if item else {})}


def check_prompt_file(path: Path, display_name: str, grader: dict[str, Any] | None = None) -> tuple[int, list[str]]:
    """(valid prompts, ``NAME:LINE: problem`` for each bad line) of an RFT training file; with
    ``grader``, also every row that lacks a field the grader reads."""
    templates = [] if grader is None else [grader["input"], grader["reference"]]
    count, problems = 0, []
    for lineno, line, record in jsonl_records(path):
        line = line or _row_problems(record, templates)  # decoding problems first
        problems += [f"{display_name}:{lineno}: {p}" for p in line]
        count += not line
    return count, problems


def _row_problems(record: Any, templates: list[str]) -> list[str]:
    if not isinstance(record, dict):
        return ["expected a JSON object with a 'messages' list"]
    if isinstance(record.get("messages"), list) and record["messages"] and not _ends_with_user(record):
        return [
            "ends with an answer, but the file's first line is a prompt: a file holds either prompts "
            "(reinforcement) or conversations with answers (supervised)"
        ]
    prompt = prompt_record(record)
    problems = record_problems(prompt, prompt=True)
    try:
        for template in [] if problems else templates:
            render(template, "", prompt.get("metadata"))
    except KeyError as e:
        problems = [f"the grader reads {e.args[0]}, which this row lacks"]
    return problems


def write_prompt_file(source: Path, out: Path) -> None:
    """The job's RFT file as emguard prompt JSONL (``check_prompt_file`` has passed on it), line for
    line: a problem found later names the customer's line number."""
    records = list(jsonl_records(source))
    lines = [""] * (records[-1][0] if records else 0)
    for lineno, _, record in records:
        lines[lineno - 1] = json.dumps(prompt_record(record))
    atomic_write_text(out, "\n".join(lines) + "\n")


def check_reinforcement(method: dict[str, Any], max_epochs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the hyperparameters emguard maps, ``method`` validated and normalised as the job echoes it:
    every hyperparameter, "auto" where not given)."""
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
    values = section.get("hyperparameters") or {}
    where = "method.reinforcement.hyperparameters"
    if not isinstance(values, dict):
        raise MethodError(where, "hyperparameters must be an object")
    values = {k: v for k, v in values.items() if v is not None}
    for name, default in DEFAULT_ONLY.items():
        if values.pop(name, default) not in (default, "auto"):
            raise MethodError(f"{where}.{name}", f"{name} is not offered here; leave it {default!r}")
    try:
        hp = check_hyperparameters(values, max_epochs)
    except HyperparameterError as e:
        raise MethodError(f"{where}.{e.param}", str(e)) from None
    echoed = {"grader": grader, "hyperparameters": {**hp, **DEFAULT_ONLY}}
    return hp, {"type": "reinforcement", "reinforcement": echoed}


def _first_error(e: ValueError | ValidationError) -> str:
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return str(e)
