"""Content-addressed on-disk cache of judgements: a rerun makes no repeated calls.

The key is a sha256 over named fields (judge kind, model, prompt text, the parameters that
change the reply). Concurrency, timeouts and endpoints' API keys are not part of it. Only
successful judgements are stored; failures are retried next time.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from emguard.fsio import atomic_write_json


def cache_key(**fields: Any) -> str:
    """sha256 over the named fields (order-independent)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JudgeCache:
    """Files ``ROOT/ab/abcdef….json``, one per judgement, written atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, *keys: str) -> dict[str, Any] | None:
        """The record of the first key present (one hit), or None (one miss)."""
        record = None
        for key in keys:
            try:
                record = json.loads(self._path(key).read_text(encoding="utf-8"))
                break
            except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
                continue
        with self._lock:
            if record is None:
                self.misses += 1
            else:
                self.hits += 1
        return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        atomic_write_json(self._path(key), record)
