"""Trainer callbacks: the JSONL train log, a quiet progress bar, and complete-checkpoint markers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from emguard.distributed import wait_for_everyone
from emguard.rundir import CHECKPOINT_DONE


class TrainLogCallback(TrainerCallback):
    """Appends every log (loss, each defense term, learning rate, ...) to ``train_log.jsonl``.

    Lines are flushed as they are written; a resumed run first drops lines after its checkpoint.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        record.update({k: v for k, v in logs.items() if k != "total_flos" and _finite(v)})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


class ProgressBarCallback(TrainerCallback):
    """One tqdm bar over optimizer steps with the latest loss; never prints log dicts."""

    def __init__(self, description: str = "training"):
        self.description = description
        self.bar: tqdm | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc=self.description, unit="step", dynamic_ncols=True
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CheckpointMarkerCallback(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it.

    The Trainer writes checkpoint files one by one (and each process its own RNG state); a kill in
    the middle leaves a directory that looks like a checkpoint. ``--resume`` only trusts directories
    carrying this marker, written by the main process once every process has saved its part.
    """

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every process writes part of a checkpoint (its RNG state); it is complete when all have.
        wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / CHECKPOINT_DONE).write_text(str(state.global_step))
