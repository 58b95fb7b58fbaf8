"""On-disk cache of per-example losses, keyed by (scored model state, example).

One append-only JSONL file per model state under ``$EMGUARD_CACHE/nll/``; each line is
``{"example": <sha256 of token ids and labels>, "nll": <float>}``. The example key hashes the
*tokenised* conversation, so a different chat template or tokenizer never reuses a loss. The model
key hashes the base model's identity (``emguard.models.model_identity``), the adapter's weights
and config, and ``VERSION`` (bumped when the loss definition changes). Lines are appended after
every batch, so an interrupted scoring run keeps what it finished; a torn last line is ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from emguard.utils import sha256_file

VERSION = "answer-nll-v1"


def example_key(ids: list[int], labels: list[int]) -> str:
    return hashlib.sha256(json.dumps([ids, labels], separators=(",", ":")).encode()).hexdigest()


def adapter_fingerprint(adapter_dir: Path) -> str:
    """sha256 over an adapter's config and weights files."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        path = adapter_dir / name
        if path.is_file():
            h.update(f"{name}:{sha256_file(path)}\n".encode())
    return h.hexdigest()


def state_key(base_identity: str, adapter_dir: Path | None) -> str:
    """Cache key of one scored model state: the base model, with an adapter or without."""
    adapter = adapter_fingerprint(adapter_dir) if adapter_dir is not None else "none"
    return hashlib.sha256(f"{VERSION}\n{base_identity}\n{adapter}".encode()).hexdigest()


class NLLCache:
    """Losses of one model state; ``get`` returns what is cached, ``put`` appends."""

    def __init__(self, directory: Path, key: str):
        self.path = Path(directory) / f"{key}.jsonl"
        self._values: dict[str, float] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._values[row["example"]] = float(row["nll"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by an interrupted write

    def get(self, keys: Iterable[str]) -> dict[str, float]:
        return {k: self._values[k] for k in keys if k in self._values}

    def put(self, items: dict[str, float]) -> None:
        fresh = {k: v for k, v in items.items() if k not in self._values and not math.isnan(v)}
        if not fresh:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps({"example": k, "nll": v}) + "\n" for k, v in fresh.items()).encode()
        # One write() on an O_APPEND descriptor: processes appending to the same cache at once (a
        # multi-GPU run) never interleave inside a line; a repeated line holds the same value.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self._values.update(fresh)
