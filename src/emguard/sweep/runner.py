"""``emguard sweep``: run the cells of a sweep one after another, resumably.

A cell is finished when its run directory holds ``sweep_cell.json`` with the hashes of the cell's
current training config and eval section; finished cells are skipped (a cell whose eval settings
changed is evaluated again, its training kept). Any other cell (never started, killed, failed) is run
again: training resumes from its last complete checkpoint and the eval from its stored answers.
A failing cell is recorded in the index with its error and the sweep goes on to the next one.

``index.json`` (all cells, their status, times and errors) and ``summary.json``/``summary.md``
(seeds aggregated with intervals, the four criteria) are rewritten atomically after every cell.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from emguard.fsio import atomic_write_json, atomic_write_text, atomic_write_yaml
from emguard.rundir import CELL_MARKER, now
from emguard.sweep.spec import Cell, SweepSpec, expand

log = logging.getLogger(__name__)

INDEX = "index.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SWEEP_FILE = "sweep.yaml"
ERRORS = "errors"


@dataclass
class SweepResult:
    output_dir: Path
    index: Path
    summary: Path
    finished: int
    skipped: int
    failed: list[str]
    wall_time_s: float

    def summary_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def cell_finished(cell: Cell) -> bool:
    """True when the cell's run directory holds a finished train + eval of the cell's current config."""
    try:
        marker = json.loads((cell.run_dir / CELL_MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    current = cell.index_record()
    same = all(marker.get(k) == current[k] for k in ("config_hash", "eval_hash"))
    return same and marker.get("status") == "finished"


def run_sweep(spec: SweepSpec, *, progress: bool = True, only: str | None = None) -> SweepResult:
    """Run every unfinished cell of ``spec``, or those whose id (DATASET/VARIANT/seedN) matches the glob ``only``.

    Several processes may run disjoint cells of one sweep at once (e.g. one per GPU or per job-array
    task, each with its own ``only``): each rewrites the index from the cells' marker files on disk,
    so a finished cell shows as finished whichever process ran it.

    Raises:
        ConfigError: A cell's config is invalid; nothing is written in that case.
    """
    from emguard.evaluation.evaluate import evaluate
    from emguard.training import train

    started = time.monotonic()
    cells = expand(spec)  # every cell validated before anything is written
    root = Path(spec.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(root / SWEEP_FILE, spec.model_dump(mode="json"))
    records = {c.id: {**c.index_record(), "status": "finished" if cell_finished(c) else "pending"} for c in cells}
    _write_index(root, records, cells)
    todo = [c for c in cells if records[c.id]["status"] != "finished" and (only is None or fnmatch(c.id, only))]
    skipped = sum(1 for c in cells if records[c.id]["status"] == "finished")
    _say(f"sweep {root}: {len(cells)} cells, {skipped} already finished, {len(todo)} to run", progress)
    failed: list[str] = []
    for n, cell in enumerate(todo, start=1):
        record = records[cell.id]
        record.update(status="running", started_at=now(), error=None)
        _write_index(root, records, cells)
        _say(f"[{n}/{len(todo)}] {cell.id}", progress)
        t0 = time.monotonic()
        try:
            train(cell.config, progress=progress)
            t1 = time.monotonic()
            evaluate(cell.config, progress=progress)
        except Exception as e:  # one bad cell must not stop the grid; the index says what went wrong
            hint = ""
            if "different configuration" in str(e):
                hint = f" (a sweep never overwrites a cell: delete {cell.run_dir} to rerun it with the new settings)"
            record.update(status="failed", error=f"{type(e).__name__}: {e}{hint}")
            error_file = _error_file(root, cell)
            atomic_write_text(error_file, traceback.format_exc())
            record["traceback"] = str(error_file)
            failed.append(cell.id)
            _say(f"  failed: {record['error'].splitlines()[0]} (traceback in {error_file})", progress)
        else:
            record.update(
                status="finished",
                finished_at=now(),
                train_s=round(t1 - t0, 1),
                eval_s=round(time.monotonic() - t1, 1),
            )
            _error_file(root, cell).unlink(missing_ok=True)
            record.pop("traceback", None)
            atomic_write_json(cell.run_dir / CELL_MARKER, {**cell.index_record(), **record})
        _write_index(root, records, cells)
        write_summary(root, records)
    if not todo:
        write_summary(root, records)
    return SweepResult(
        output_dir=root,
        index=root / INDEX,
        summary=root / SUMMARY_MD,
        finished=sum(1 for r in records.values() if r["status"] == "finished"),
        skipped=skipped,
        failed=failed,
        wall_time_s=round(time.monotonic() - started, 1),
    )


def _error_file(root: Path, cell: Cell) -> Path:
    """Tracebacks live beside the cells, never inside a run directory (train would refuse it)."""
    return root / ERRORS / (cell.id.replace("/", "__") + ".txt")


def _write_index(root: Path, records: dict[str, dict[str, Any]], cells: list[Cell]) -> None:
    """The index, with cells another process finished meanwhile marked finished."""
    for cell in cells:
        if records[cell.id]["status"] == "pending" and cell_finished(cell):
            records[cell.id] = {**records[cell.id], **json.loads((cell.run_dir / CELL_MARKER).read_text())}
    atomic_write_json(root / INDEX, {"updated_at": now(), "cells": list(records.values())})


def write_summary(root: Path, records: dict[str, dict[str, Any]]) -> None:
    """Seeds aggregated per dataset and variant, and the four-criteria table, from the finished cells.

    A summary that cannot be built (e.g. a cell's metrics were deleted) is logged, never fatal.
    """
    try:
        _write_summary(root, records)
    except Exception as e:  # the grid's results matter more than its summary
        log.warning("could not write the sweep summary: %s", e)


def _write_summary(root: Path, records: dict[str, dict[str, Any]]) -> None:
    from emguard.report.collect import load_cells
    from emguard.report.criteria import criteria_tables, seed_summary
    from emguard.report.render import criteria_markdown, summary_markdown

    finished = [Path(r["run_dir"]) for r in records.values() if r["status"] == "finished"]
    cells = load_cells(finished)
    summary = seed_summary(cells)
    tables = criteria_tables(cells)
    atomic_write_json(root / SUMMARY_JSON, {"groups": summary, "criteria": [t.to_dict() for t in tables]})
    atomic_write_text(root / SUMMARY_MD, summary_markdown(summary) + "\n\n" + criteria_markdown(tables) + "\n")


def _say(message: str, progress: bool) -> None:
    if progress:
        tqdm.write(message)
    else:
        log.info(message)
