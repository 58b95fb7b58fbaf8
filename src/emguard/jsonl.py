"""Reading JSONL records with ``SOURCE:LINE`` problem reports (evaluation files: judged samples, probe pairs)."""

from __future__ import annotations

import json
from typing import Any


def jsonl_objects(text: str, source: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """``([(line number, object), ...], problems)`` for the non-blank lines of ``text``.

    A line that is not JSON, or not a JSON object, becomes a ``SOURCE:LINE: message`` problem.
    """
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{source}:{number}: invalid JSON ({e.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{source}:{number}: expected a JSON object")
            continue
        rows.append((number, record))
    return rows, problems
