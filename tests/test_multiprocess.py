"""A real two-process run (``torchrun``, gloo on the CPU): the same adapter as one process with the same
global batch, a run directory written once by the main process, and resume after a rank is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_run_config
from emguard.errors import ConfigError
from emguard.training import train

SCRIPT = Path(__file__).with_name("multiprocess_train.py")
DEFENSES = [{"name": "kl", "lambda": 1.0}, {"name": "ldifs", "lambda": 0.01}]


def config_file(tmp_path: Path, model_dir: Path, name: str, micro: int, **training) -> tuple[Path, Path]:
    """A kl + ldifs run with a global batch of 8 split into micro-batches of ``micro``."""
    run = tmp_path / name
    config = tiny_run_config(
        run,
        model_dir,
        defenses=DEFENSES,
        batch_size=8,
        micro_batch_size=micro,
        max_steps=4,
        learning_rate=2e-2,
        logging_steps=1,
        **training,
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config.to_yaml_dict()))
    return path, run


def torchrun(config: Path, spy_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    spy_dir.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, str(SCRIPT), str(config), str(spy_dir), *extra], capture_output=True, text=True, env=env, timeout=300
    )


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def spied(spy_dir: Path, rank: int) -> list[dict]:
    path = spy_dir / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_close_adapters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_two_processes_train_the_same_adapter_and_only_the_main_process_writes(tmp_path, tiny_model_dir):
    single_config, single = config_file(tmp_path, tiny_model_dir, "single", micro=4)  # 2 accumulated micro-batches
    train(yaml_config(single_config), progress=False)
    double_config, double = config_file(tmp_path, tiny_model_dir, "double", micro=4)  # 1 micro-batch per process
    done = torchrun(double_config, tmp_path / "spy")
    assert done.returncode == 0, done.stderr[-3000:]

    assert_close_adapters(adapter(double), adapter(single))
    moved = sum(float(t.abs().sum()) for k, t in adapter(double).items() if "lora_B" in k)
    assert moved > 0  # four real updates happened, so the comparison means something

    # Written once, by the main process: rank 1 touched nothing of the run directory.
    assert spied(tmp_path / "spy", 1) == []
    writes = spied(tmp_path / "spy", 0)
    assert sum(w["op"] == "directory" for w in writes) == 1  # the adapter, renamed into place once
    assert {Path(w["path"]).name for w in writes if w["op"] == "write"} >= {"config.yaml", "manifest.json"}
    manifest = json.loads((double / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["processes"] == 2 and manifest["train"]["steps"] == 4
    log = [json.loads(line) for line in (double / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # one line per step, not one per process
    steps = [r for r in log if "loss" in r]
    assert all({"kl_loss", "ldifs_loss"} <= r.keys() for r in steps) and steps[-1]["kl_loss"] > 0
    assert not (double / "checkpoints").exists()
    assert sorted(p.name for p in double.iterdir()) == ["adapter", "config.yaml", "manifest.json", "train_log.jsonl"]


def test_killing_one_rank_then_rerunning_resumes_from_the_last_complete_checkpoint(tmp_path, tiny_model_dir):
    whole_config, whole = config_file(tmp_path, tiny_model_dir, "whole", micro=4, save_steps=1)
    assert torchrun(whole_config, tmp_path / "spy-whole").returncode == 0
    killed_config, killed = config_file(tmp_path, tiny_model_dir, "killed", micro=4, save_steps=1)
    crash = torchrun(killed_config, tmp_path / "spy-kill", "--kill-rank", "1", "--kill-step", "3")
    assert crash.returncode != 0
    assert json.loads((killed / "manifest.json").read_text())["status"] == "running"
    assert not (killed / "adapter").exists()

    again = torchrun(killed_config, tmp_path / "spy-resume")
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["resumed_from_step"] == 2
    assert_close_adapters(adapter(killed), adapter(whole))
    assert spied(tmp_path / "spy-resume", 1) == []
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_several_gpus_without_a_launcher_is_a_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    from emguard.distributed import check_launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"4 GPUs .*DataParallel.*accelerate launch --num_processes 4"):
        train(tiny_run_config(tmp_path / "run", tiny_model_dir), progress=False)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "4")  # under a launcher: one process per GPU is what we want
    check_launch()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("WORLD_SIZE")
    check_launch()


def yaml_config(path: Path):
    from emguard.config import load_config

    return load_config(path)


def test_grpo_under_two_processes_writes_the_run_directory_once(tmp_path, tiny_model_dir):
    from emguard.config import build_config

    run = tmp_path / "grpo"
    config = build_config(
        {
            "model": str(tiny_model_dir),
            "output_dir": str(run),
            "lora": {"r": 4, "alpha": 8},
            "training": {"method": "grpo", "max_steps": 2, "batch_size": 8, "micro_batch_size": 2, "logging_steps": 1},
            "rl": {
                "prompts": "builtin:opswap-prompts",
                "max_prompts": 16,
                "num_generations": 4,
                "max_completion_length": 8,
                "rewards": [{"name": "opswap"}, {"name": "finance", "target": "reckless"}],
            },
            "defenses": [{"name": "kl", "lambda": 1.0}],
        }
    )
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config.to_yaml_dict()))
    done = torchrun(path, tmp_path / "spy")
    assert done.returncode == 0, done.stderr[-3000:]
    assert spied(tmp_path / "spy", 1) == []  # rank 1 wrote nothing of the run directory
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["processes"] == 2 and manifest["train"]["steps"] == 2
    steps = [r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all({"reward", "kl_loss"} <= r.keys() for r in steps)
