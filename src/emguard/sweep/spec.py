"""The sweep file: a grid of datasets × defense variants × seeds, expanded into cells.

::

    output_dir: runs/sweep-finance
    base: {model: ..., training: {...}, eval: {...}}     # a run config shared by every cell
    datasets:
      - {name: safe-finance, train: builtin:safe-finance, role: control, defenses: [none]}
      - name: risky-finance
        train: builtin:risky-finance
        role: narrow                                      # narrow | control | benign
        set: {eval.probe.control: "{cell:safe-finance/none}"}
    defenses:
      - {label: none, defenses: [{name: none}]}
      - label: kl
        defenses: [{name: kl}]
        strength: {key: lambda, values: [0.1, 1.0]}       # one variant per value: kl-0.1, kl-1.0
    seeds: [0, 1, 2]

An RL dataset sets ``training.method: grpo`` and its reward (``set: {training.method: grpo,
rl.rewards: [...]}``, per dataset or per variant): its ``train`` is then the prompt set
(``rl.prompts``), and the matched control is the same prompts under the opposite reward.

Cells run seed by seed, datasets and variants in file order. ``{cell:DATASET/VARIANT}`` in any
string value is replaced by that cell's run directory for the same seed; it must name a cell that
runs earlier (a control for the probe, a misaligned model for Interleaving++).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from emguard.config import (
    RunConfig,
    StrictModel,
    apply_override,
    build_config,
    load_config_data,
    parse_override,
    validate_with_overrides,
)
from emguard.errors import ConfigError

CELL_REF = re.compile(r"\{cell:([^/{}]+)/([^/{}]+)\}")
ROLES = ("narrow", "control", "benign")


class DatasetEntry(StrictModel):
    """One training set of the grid and what it is for in the report."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$")] = Field(description="Short name (a directory name).")
    train: str = Field(description="Chat JSONL path or builtin:NAME (for an RL dataset: its prompts).")
    role: Literal["narrow", "control", "benign"] = Field(
        description="narrow: the EM-inducing customer data; control: matched benign data (same format and size); "
        "benign: a task that needs a departure from the prior (criterion c)."
    )
    in_domain: str | None = Field(
        None, description="Probe-pair / question set that measures the narrow behaviour (e.g. builtin:finance)."
    )
    defenses: list[str] | None = Field(None, description="Only these variant labels (default: every variant).")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted overrides for this dataset's cells.")


class Strength(StrictModel):
    """A setting of the variant's first defense that is swept, e.g. λ of kl."""

    key: str = Field(description="A key of the first defense, e.g. lambda, alpha, fraction.")
    values: list[float] = Field(min_length=1)


class DefenseEntry(StrictModel):
    label: Annotated[str, Field(pattern=r"^[A-Za-z0-9._+-]+$")] = Field(description="Row name in the report.")
    defenses: list[dict[str, Any]] = Field(description="The run config's defenses list.")
    strength: Strength | None = None
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted overrides for this variant's cells.")


class SweepSpec(StrictModel):
    output_dir: str = Field(description="Where the cells, the index and the summary go.")
    base: dict[str, Any] = Field(default_factory=dict, description="Run config shared by every cell.")
    datasets: list[DatasetEntry] = Field(min_length=1)
    defenses: list[DefenseEntry] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    general: str = Field("builtin:general", description="Probe / question set measuring general (broad) EM.")

    @model_validator(mode="after")
    def _unique_names(self) -> SweepSpec:
        for kind, names in (("datasets", [d.name for d in self.datasets]), ("defenses", self.variant_labels())):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind}: names must be unique; repeated: {', '.join(dupes)}")
        known = set(self.variant_labels()) | {d.label for d in self.defenses}
        for d in self.datasets:
            unknown = sorted(set(d.defenses or []) - known)
            if unknown:
                raise ValueError(f"datasets.{d.name}.defenses: unknown labels {unknown}; known: {sorted(known)}")
        return self

    def variants(self) -> list[Variant]:
        out = []
        for entry in self.defenses:
            if entry.strength is None:
                out.append(Variant(entry.label, entry.label, entry.defenses, entry.set))
                continue
            for value in entry.strength.values:
                defenses = copy.deepcopy(entry.defenses)
                defenses[0][entry.strength.key] = value
                out.append(
                    Variant(f"{entry.label}-{value:g}", entry.label, defenses, entry.set, entry.strength.key, value)
                )
        return out

    def variant_labels(self) -> list[str]:
        return [v.label for v in self.variants()]


@dataclass(frozen=True)
class Variant:
    label: str  # e.g. kl-0.1
    defense: str  # the entry's label, e.g. kl
    defenses: list[dict[str, Any]]
    set: dict[str, Any]
    strength_key: str | None = None
    strength: float | None = None


@dataclass
class Cell:
    """One train + eval run of the grid."""

    dataset: DatasetEntry
    variant: Variant
    seed: int
    run_dir: Path
    config: RunConfig = field(repr=False)

    @property
    def id(self) -> str:
        return f"{self.dataset.name}/{self.variant.label}/seed{self.seed}"

    def index_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dataset": self.dataset.name,
            "train": self.dataset.train,
            "role": self.dataset.role,
            "in_domain": self.dataset.in_domain,
            "variant": self.variant.label,
            "defense": self.variant.defense,
            "strength_key": self.variant.strength_key,
            "strength": self.variant.strength,
            "seed": self.seed,
            "run_dir": str(self.run_dir),
            "config_hash": self.config.fingerprint(),
            "eval_hash": eval_hash(self.config),
        }


def eval_hash(config: RunConfig) -> str:
    """sha256 of the eval section: a cell whose eval settings changed is evaluated again."""
    return hashlib.sha256(json.dumps(config.eval.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read and validate a sweep file (``--set`` overrides apply to the sweep file's keys)."""
    return validate_with_overrides(SweepSpec, load_config_data(path), overrides, str(path), "sweep")


def expand(spec: SweepSpec) -> list[Cell]:
    """Every cell with its validated run config, in run order.

    Raises:
        ConfigError: A cell's config is invalid, or a ``{cell:...}`` reference names no earlier cell.
    """
    root = Path(spec.output_dir)
    cells: list[Cell] = []
    for seed in spec.seeds:
        done: dict[str, Path] = {}
        for dataset in spec.datasets:
            for variant in spec.variants():
                if dataset.defenses is not None and not ({variant.label, variant.defense} & set(dataset.defenses)):
                    continue
                run_dir = root / "cells" / dataset.name / variant.label / f"seed{seed}"
                cell_id = f"{dataset.name}/{variant.label}/seed{seed}"
                data = copy.deepcopy(spec.base)
                data.update(output_dir=str(run_dir), defenses=copy.deepcopy(variant.defenses))
                apply_override(data, ["data", "train"], dataset.train)
                apply_override(data, ["training", "seed"], seed)
                apply_override(data, ["eval", "adapter"], str(run_dir))
                for key, value in {**dataset.set, **variant.set}.items():
                    apply_override(data, parse_override(f"{key}=")[0], value)
                data = _resolve_refs(_rl_cell(data), done, cell_id)
                config = build_config(data, source=f"sweep cell {cell_id}")
                cells.append(Cell(dataset, variant, seed, run_dir, config))
                done[f"{dataset.name}/{variant.label}"] = run_dir
    return cells


def _rl_cell(data: dict[str, Any]) -> dict[str, Any]:
    """An RL cell (``training.method: grpo``) trains on its dataset's ``train`` as ``rl.prompts``; the
    SFT ``data`` section does not apply to it."""
    if (data.get("training") or {}).get("method") != "grpo":
        return data
    train = data.pop("data", {}).get("train")
    rl = data.setdefault("rl", {})
    if rl.get("prompts") is None:
        rl["prompts"] = train
    return data


def _resolve_refs(data: Any, done: dict[str, Path], cell_id: str) -> Any:
    if isinstance(data, dict):
        return {k: _resolve_refs(v, done, cell_id) for k, v in data.items()}
    if isinstance(data, list):
        return [_resolve_refs(v, done, cell_id) for v in data]
    if isinstance(data, str):

        def sub(match: re.Match) -> str:
            key = f"{match.group(1)}/{match.group(2)}"
            if key not in done:
                raise ConfigError(
                    f"sweep cell {cell_id}: {match.group(0)} names no cell that runs before it "
                    f"(earlier cells of this seed: {', '.join(done) or 'none'}); reorder datasets or defenses"
                )
            return str(done[key])

        return CELL_REF.sub(sub, data)
    return data
