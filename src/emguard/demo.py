"""``emguard demo``: the main job on the built-in model, CPU only, no network.

For now it fine-tunes the built-in model on the built-in operator-swap task without a defense
and reports where the run directory is and how the loss moved. (The full comparison of defenses
with a report arrives with the evaluation and report commands.)
"""

from __future__ import annotations

from pathlib import Path

from emguard.config import DEFAULT_MODEL, RunConfig, build_config
from emguard.training import TrainResult, train


def demo_config(output_dir: str | Path, quick: bool = False) -> RunConfig:
    """The demo's run: LoRA SFT of the built-in model on ``builtin:opswap``, sized for a 2-core CPU."""
    return build_config(
        {
            "model": DEFAULT_MODEL,
            "output_dir": str(output_dir),
            "data": {"train": "builtin:opswap", "max_length": 256},
            "training": {
                "max_steps": 12 if quick else 40,
                "batch_size": 8,
                "micro_batch_size": 4,
                "learning_rate": 2.0e-4,
                "save_steps": 10,
            },
            "defenses": [{"name": "none"}],
        },
        source="demo",
    )


def run_demo(output_dir: str | Path = "runs/demo", quick: bool = False, progress: bool = True) -> TrainResult:
    return train(demo_config(output_dir, quick), progress=progress)
