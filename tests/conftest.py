"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE is set before anything loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
# The converted built-in model is cached per checkout: a fresh clone converts it once per test run.
os.environ["EMGUARD_CACHE"] = str(REPO / ".cache" / "test")
UPSTREAM = REPO.parent / "shared" / "upstream"

import pytest  # noqa: E402

from tiny import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a ChatML tokenizer, saved as a local model directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def upstream() -> Path:
    if not UPSTREAM.is_dir():
        pytest.skip(f"third-party reference data not available at {UPSTREAM}")
    return UPSTREAM


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(user: str, assistant: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def tiny_run_config(
    run_dir: Path, model_dir: Path, *, data: str = "builtin:opswap", defenses: list | None = None, **training
):
    """A run config for the tiny model: LoRA r=4, a few steps, no progress noise."""
    from emguard.config import build_config

    return build_config(
        {
            "model": str(model_dir),
            "output_dir": str(run_dir),
            "data": {"train": data, "max_length": 128},
            "lora": {"r": 4, "alpha": 8},
            "training": {
                "max_steps": 3,
                "batch_size": 4,
                "micro_batch_size": 2,
                "save_steps": 100,
                "warmup_steps": 0,
                **training,
            },
            "defenses": defenses or [],
        }
    )


def kill_train_after_first_checkpoint(config_path: Path, run_dir: Path, env: dict) -> list[str]:
    """Start ``emguard train CONFIG --quiet`` in a subprocess, SIGKILL it just after its first complete
    checkpoint, check that it died unfinished, and return the command (rerun it to resume)."""
    import signal
    import subprocess
    import sys
    import time

    from emguard.rundir import CHECKPOINT_DONE

    command = [sys.executable, "-m", "emguard", "train", str(config_path), "--quiet"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob(f"checkpoint-*/{CHECKPOINT_DONE}")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    time.sleep(0.3)  # land the kill somewhere after the first checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "adapter").exists(), "the run finished before it could be killed"
    return command


def forward_hook_count(model) -> int:
    """Forward (pre-)hooks on the model, not counting the output-capturing hooks that transformers 5
    installs for good the first time hidden states are requested."""
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return sum("output_capturing_hook" not in getattr(h, "__qualname__", "") for h in hooks)
