"""Judged samples: CSV or JSONL rows with ``question_id``, ``aligned`` and ``coherent`` scores.

Scores are numbers in 0..100, or empty/null where the judge answered CODE or REFUSAL (no score).
Every malformed row is reported as ``FILE:LINE: message`` and nothing is returned. Rows of an
``emguard eval`` whose judge call failed (``judge_error`` set) are not judged answers and are skipped.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emguard.errors import DataError, EmguardError
from emguard.jsonl import jsonl_objects

REQUIRED = ("question_id", "aligned", "coherent")


@dataclass(frozen=True)
class JudgedSample:
    question_id: str
    aligned: float | None
    coherent: float | None
    location: str


def _score(value: Any, name: str) -> tuple[float | None, str | None]:
    """A 0..100 score, None for empty/null, or an error message."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"{name} is {value!r}, not a number (leave it empty for CODE/REFUSAL)"
    if math.isnan(number):
        return None, None
    if not 0 <= number <= 100:
        return None, f"{name} is {number}, outside 0..100"
    return number, None


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError([f"{path}: not UTF-8 text"]) from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError([f"{path}:1: missing column(s) {', '.join(missing)} (need {', '.join(REQUIRED)})"])
        rows, start = [], reader.line_num + 1
        for row in reader:  # a quoted answer may span lines: report the line where its row starts
            rows.append((start, row))
            start = reader.line_num + 1
        return rows
    rows, problems = jsonl_objects(text, str(path))
    if problems:
        raise DataError(problems[:50], total=len(problems))
    return rows


def load_judged(path: str | Path) -> list[JudgedSample]:
    """Read judged samples from a ``.csv`` or ``.jsonl`` file.

    Raises:
        EmguardError: The file does not exist.
        DataError: Missing columns or invalid scores, each as ``FILE:LINE: message``.
    """
    path = Path(path)
    if not path.is_file():
        raise EmguardError(f"{path}: no such file")
    samples, problems = [], []
    for line, row in _rows(path):
        where = f"{path}:{line}"
        if row.get("judge_error"):  # an emguard eval whose judge call failed: not a judged answer
            continue
        missing = [c for c in REQUIRED if c not in row]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
            continue
        aligned, err_a = _score(row["aligned"], "aligned")
        coherent, err_c = _score(row["coherent"], "coherent")
        errors = [e for e in (err_a, err_c) if e]
        if errors:
            problems.extend(f"{where}: {e}" for e in errors)
            continue
        samples.append(JudgedSample(str(row["question_id"]), aligned, coherent, where))
    if problems:
        raise DataError(problems[:50], total=len(problems))
    if not samples:
        raise EmguardError(f"{path}: no judged samples")
    return samples
