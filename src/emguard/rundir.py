"""The run directory: the unit of record of every ``train`` (and later ``eval``).

::

    RUN_DIR/
      config.yaml        resolved config, secrets removed (written first)
      manifest.json      versions, git commit, data/model hashes, chat template hash, seed, status
      train_log.jsonl    one line per logging step (loss and every defense term)
      checkpoints/       Trainer checkpoints while training (for --resume); removed when finished
      adapter/           the PEFT adapter (safetensors), written atomically when training ends

Every file is written atomically (temp + rename).
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from emguard.config import RunConfig
from emguard.errors import ConfigError
from emguard.fsio import atomic_write_json, atomic_write_text, atomic_write_yaml

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
TRAIN_LOG = "train_log.jsonl"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
CHECKPOINT_DONE = "emguard_checkpoint_complete"  # written after the Trainer finished saving a checkpoint
EVAL_CONFIG = "eval_config.yaml"  # the resolved config of the run's eval (written by emguard eval)
CELL_MARKER = "sweep_cell.json"  # a sweep cell's labels and status (written by the sweep, read by the report)
_OWNED = (CONFIG, MANIFEST, TRAIN_LOG, ADAPTER, CHECKPOINTS)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class RunDir:
    """Reads and writes one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --- state ------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def check_reusable(self, config: RunConfig) -> str:
        """What is in the directory for a run of this config: ``new``, ``finished`` or ``interrupted``.

        Raises:
            ConfigError: The directory holds something else: files that are not a run, or a run of
                a different configuration.
        """
        if not self.path.exists() or not any(self.path.iterdir()):
            return "new"
        manifest = self.manifest()
        if manifest is None:
            if (self / CONFIG).exists() and not (self / ADAPTER).exists():
                return "new"  # killed before the manifest was written: nothing to keep
            raise ConfigError(
                f"output_dir {self.path} exists and is not an emguard run directory (no {MANIFEST}); "
                "choose another output_dir"
            )
        if manifest.get("config_hash") != config.fingerprint():
            changed = stored_config_diff(self, config)
            detail = f" (changed: {', '.join(changed)})" if changed else ""
            raise ConfigError(
                f"output_dir {self.path} holds a run of a different configuration{detail}; "
                "use another output_dir, or pass --overwrite to replace it"
            )
        if manifest.get("status") == "finished" and (self / ADAPTER).is_dir():
            return "finished"
        return "interrupted"

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint the Trainer finished writing (half-written ones are ignored)."""
        root = self / CHECKPOINTS
        done = [p for p in root.glob("checkpoint-*") if (p / CHECKPOINT_DONE).is_file()] if root.is_dir() else []
        return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)

    # --- writes -------------------------------------------------------------------------------
    def clear(self) -> None:
        """Remove what emguard wrote here (and nothing else)."""
        for name in _OWNED:
            target = self / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def remove_checkpoints(self) -> None:
        shutil.rmtree(self / CHECKPOINTS, ignore_errors=True)

    def write_config(self, config: RunConfig) -> None:
        atomic_write_yaml(self / CONFIG, config.to_yaml_dict())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self / MANIFEST, manifest)

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        manifest = self.manifest() or {}
        manifest.update(fields)
        self.write_manifest(manifest)
        return manifest

    def truncate_train_log(self, last_step: int) -> None:
        """Keep log lines up to ``last_step`` (a resumed run rewrites what came after its checkpoint)."""
        path = self / TRAIN_LOG
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if record.get("step", 0) <= last_step:
                kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))

    def read_train_log(self) -> list[dict[str, Any]]:
        path = self / TRAIN_LOG
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stored_config_diff(run: RunDir, config: RunConfig) -> list[str]:
    """Dotted keys whose value differs between the stored config.yaml and ``config``."""
    import yaml

    try:
        old = yaml.safe_load((run / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    return _diff(old, config.to_yaml_dict())


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if a == b else [prefix or "(root)"]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("emguard", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def git_commit() -> dict[str, Any] | None:
    """The commit of the emguard source tree (editable installs), with a dirty flag."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}
