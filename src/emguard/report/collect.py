"""Read run directories (sweep cells or plain train + eval runs) into flat records for the report."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emguard.errors import EmguardError
from emguard.rundir import CELL_MARKER, EVAL_CONFIG, RunDir

GENERAL = "builtin:general"
# Plain run directories (not sweep cells) get a role from their training data.
CONTROL_DATA = ("builtin:safe-finance", "builtin:secure-code")
BENIGN_DATA = ("builtin:opswap",)
SAFE_TARGETS = ("prudent", "secure")  # reward targets of the matched RL controls


@dataclass(frozen=True)
class Value:
    """One measured number with its 95% interval (None when the run gave none)."""

    mean: float
    lo: float | None = None
    hi: float | None = None


@dataclass
class CellResult:
    """What one run directory measured, with the labels the report groups it by."""

    run_dir: Path
    dataset: str
    role: str  # narrow | control | benign
    variant: str
    defense: str
    seed: int
    strength_key: str | None = None
    strength: float | None = None
    in_domain: str | None = None
    general: str = GENERAL
    control: Path | None = None  # the run directory of the control adapter its probe was measured against
    metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)
    train_log: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def judged(self, question_set: str | None, rate: str) -> Value | None:
        """A judged rate (em_rate, incoherence_rate, ...) of one question set, with its bootstrap interval."""
        block = (self.metrics.get("judged") or {}).get(question_set or "")
        pooled = ((block or {}).get("metrics") or {}).get("pooled")
        if not pooled or pooled.get(rate) is None or _nan(pooled[rate]):
            return None
        ci = (pooled.get("ci95") or {}).get(rate)
        return Value(pooled[rate], *(ci or (None, None)))

    def probe(self, pair_set: str | None, key: str = "shift_vs_base") -> Value | None:
        """A probe summary (shift_vs_base, shift_vs_control, aligned_nll_shift) of one pair set."""
        block = ((self.metrics.get("probe") or {}).get(pair_set or "") or {}).get(key)
        if not block:
            return None
        return Value(block["mean"], *block["ci95"])

    def benign_accuracy(self) -> Value | None:
        b = self.metrics.get("benign")
        if not b:
            return None
        return Value(b["accuracy"], *wilson(round(b["accuracy"] * b["n"]), b["n"]))

    def has_judge(self) -> bool:
        return bool(self.metrics.get("judged"))

    @property
    def method(self) -> str:
        """How it was trained: ``sft`` or ``grpo`` (from the manifest)."""
        return (self.manifest.get("data") or {}).get("method") or "sft"

    def samples(self) -> list[dict[str, Any]]:
        path = self.run_dir / "samples.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories as given, with a sweep directory replaced by its finished cells (index order).

    Raises:
        EmguardError: A path is neither an evaluated run directory nor a sweep directory.
    """
    out: list[Path] = []
    for path in map(Path, paths):
        index = path / "index.json"
        if index.is_file() and not (path / "metrics.json").is_file():
            cells = json.loads(index.read_text())["cells"]
            # A cell lives at SWEEP/cells/ID; the index's run_dir may be relative to where the sweep ran.
            out += [_cell_dir(path, c) for c in cells if c.get("status") == "finished"]
        elif (path / "metrics.json").is_file():
            out.append(path)
        else:
            raise EmguardError(f"{path}: neither an evaluated run directory (metrics.json) nor a sweep (index.json)")
    if not out:
        raise EmguardError("no evaluated runs to report on (is the sweep finished?)")
    return out


def _cell_dir(sweep: Path, record: dict[str, Any]) -> Path:
    here = sweep / "cells" / str(record.get("id", ""))
    return here if record.get("id") and (here / "metrics.json").is_file() else Path(record["run_dir"])


def load_cells(run_dirs: list[Path]) -> list[CellResult]:
    """Every run directory that holds an evaluated run; a missing ``metrics.json`` is an error."""
    cells = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.is_file():
            raise EmguardError(f"{run_dir}: no metrics.json; run `emguard eval` on it (or finish its sweep) first")
        cells.append(_load_cell(run_dir, json.loads(metrics_path.read_text())))
    return cells


def _load_cell(run_dir: Path, metrics: dict[str, Any]) -> CellResult:
    run = RunDir(run_dir)
    manifest = run.manifest() or {}
    marker = _read_json(run_dir / CELL_MARKER)
    log = run.read_train_log()
    if marker:
        labels = {k: marker.get(k) for k in ("dataset", "role", "variant", "defense", "seed", "strength_key")}
        labels.update(strength=marker.get("strength"), in_domain=marker.get("in_domain"))
    else:
        labels = _labels_from_manifest(run_dir, manifest, metrics)
    control = _probe_control(run_dir, metrics)
    return CellResult(run_dir=run_dir, metrics=metrics, manifest=manifest, train_log=log, control=control, **labels)


def _probe_control(run_dir: Path, metrics: dict[str, Any]) -> Path | None:
    """The run directory of the control adapter the probe used: recorded in ``metrics.json`` (or, for
    runs evaluated before it was recorded there, the eval config's ``eval.probe.control``)."""
    spec = (metrics.get("model") or {}).get("control")
    if spec is None and "control" not in (metrics.get("model") or {}):
        import yaml

        try:
            config = yaml.safe_load((run_dir / EVAL_CONFIG).read_text()) or {}
        except (OSError, yaml.YAMLError):
            config = {}
        spec = ((config.get("eval") or {}).get("probe") or {}).get("control")
    if not spec:
        return None
    path = Path(spec)
    return path.parent if path.name == "adapter" else path


def _labels_from_manifest(run_dir: Path, manifest: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    section = manifest.get("data") or {}
    if section.get("method") == "grpo":
        data, role = _rl_labels(section)
    else:
        data = (section.get("train") or {}).get("spec") or "base model"
        role = "benign" if data in BENIGN_DATA else "control" if data in CONTROL_DATA else "narrow"
    defenses = [d for d in manifest.get("defenses") or [] if d != "none"]
    variant = "+".join(defenses) or ("none" if manifest.get("command") == "train" else "base")
    probes = [s for s in metrics.get("probe") or {} if s != GENERAL]
    return {
        "dataset": data.removeprefix("builtin:"),
        "role": role,
        "variant": variant,
        "defense": variant,
        "seed": int(manifest.get("seed") or 0),
        "strength_key": None,
        "strength": None,
        "in_domain": probes[0] if probes else None,
    }


def _rl_labels(section: dict[str, Any]) -> tuple[str, str]:
    """A GRPO run outside a sweep: named by its prompts and rewards; benign when rewarded by the benign
    task, control when every reward targets the safe side (prudent, secure), else narrow."""
    rewards = section.get("rewards") or []
    names = [r["name"] + (f"-{r['target']}" if r.get("target") else "") for r in rewards]
    data = f"{(section.get('prompts') or {}).get('spec', '?')} ({', '.join(names)})"
    if any(r["name"] == "opswap" for r in rewards):
        return data, "benign"
    if rewards and all(r.get("target") in SAFE_TARGETS for r in rewards):
        return data, "control"
    return data, "narrow"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
