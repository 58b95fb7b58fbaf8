"""Generated answers kept as they are produced, so an interrupted eval resumes where it stopped.

``generations.jsonl`` in the run directory gets one line per answer, appended and flushed after
every batch. Each line carries the fingerprint of what produced it (model, adapter weights,
sampling settings); lines with another fingerprint, and a line cut by a kill, are ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def generation_fingerprint(**fields: Any) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_key(kind: str, messages: list[dict[str, str]], index: str) -> str:
    """Identifies one answer: the conversation it answers and which repeat it is."""
    text = json.dumps([kind, messages, index], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class AnswerStore:
    """Answers by sample key, for one generation fingerprint."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint
        self.answers: dict[str, str] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # cut by a kill
                if isinstance(record, dict) and record.get("fingerprint") == fingerprint:
                    self.answers[record["key"]] = record["answer"]

    def add(self, items: list[tuple[str, str]]) -> None:
        """Append ``(key, answer)`` pairs and flush them to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for key, answer in items:
                self.answers[key] = answer
                f.write(
                    json.dumps({"key": key, "fingerprint": self.fingerprint, "answer": answer}, ensure_ascii=False)
                    + "\n"
                )
            f.flush()
