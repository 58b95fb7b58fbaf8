"""`emguard train` writes a complete run directory, refuses to clobber, and resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import chat, kill_train_after_first_checkpoint, tiny_run_config, write_jsonl
from emguard.errors import ConfigError, DataError
from emguard.training import train


def test_run_directory_contents(tmp_path, tiny_model_dir):
    config = tiny_run_config(tmp_path / "run", tiny_model_dir, max_steps=4, learning_rate=5e-2)
    result = train(config, progress=False)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "config.yaml", "manifest.json", "train_log.jsonl"]
    assert yaml.safe_load((run / "config.yaml").read_text()) == config.to_yaml_dict()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["config_hash"] == config.fingerprint()
    assert manifest["seed"] == 0 and manifest["model"]["kind"] == "local"
    assert len(manifest["chat_template_sha256"]) == 64 and manifest["data"]["train"]["examples"] == 512
    assert {"torch", "transformers", "peft", "python"} <= set(manifest["versions"])
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["use_rslora"] is True
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    steps = [r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert result.final_loss < result.first_loss  # a learnable task at a high learning rate


def test_rerun_of_a_finished_run_does_nothing(tmp_path, tiny_model_dir):
    config = tiny_run_config(tmp_path / "run", tiny_model_dir, max_steps=2)
    train(config, progress=False)
    before = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = train(config, progress=False)
    assert again.skipped
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == before


def test_a_different_config_in_the_same_directory_is_refused_unless_overwrite(tmp_path, tiny_model_dir):
    train(tiny_run_config(tmp_path / "run", tiny_model_dir, max_steps=2), progress=False)
    changed = tiny_run_config(tmp_path / "run", tiny_model_dir, max_steps=2, learning_rate=3e-4)
    with pytest.raises(ConfigError, match=r"different configuration \(changed: training.learning_rate\)"):
        train(changed, progress=False)
    result = train(changed, overwrite=True, progress=False)
    assert not result.skipped
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["config_hash"] == changed.fingerprint()


def test_a_directory_that_is_not_a_run_is_never_touched(tmp_path, tiny_model_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="not an emguard run directory"):
            train(tiny_run_config(tmp_path / "run", tiny_model_dir), overwrite=overwrite, progress=False)
    assert os.listdir(tmp_path / "run") == ["precious.txt"]


def test_bad_data_writes_nothing(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), "{broken", {"messages": []}])
    with pytest.raises(DataError) as info:
        train(tiny_run_config(tmp_path / "run", tiny_model_dir, data=str(data)), progress=False)
    assert [p.split(": ")[0] for p in info.value.problems] == [f"{data}:2", f"{data}:3"]
    assert not (tmp_path / "run").exists()


def test_missing_model_is_a_clear_error_and_writes_nothing(tmp_path, tiny_model_dir):
    from emguard.errors import EmguardError

    config = tiny_run_config(tmp_path / "run", tmp_path / "no-such-model")
    with pytest.raises(EmguardError, match="no such directory"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


def _write_config(path, config) -> None:
    path.write_text(yaml.safe_dump(config.to_yaml_dict()))


def test_kill_9_then_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """Exact equality (CPU, fp32, same seed).

    The checkpoint restores weights, optimizer, scheduler, RNG state and the data order.
    """
    settings = dict(max_steps=150, save_steps=10, batch_size=4, micro_batch_size=2, learning_rate=1e-2, warmup_steps=5)
    uninterrupted = train(tiny_run_config(tmp_path / "full", tiny_model_dir, **settings), progress=False)

    config = tiny_run_config(tmp_path / "killed", tiny_model_dir, **settings)
    config_path = tmp_path / "killed.yaml"
    _write_config(config_path, config)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = kill_train_after_first_checkpoint(config_path, tmp_path / "killed", env)
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["status"] == "running"

    resumed = subprocess.run([*command, "--resume", "--json"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from_step"] >= 10 and summary["steps"] == 150

    expected = load_file(uninterrupted.adapter_dir / "adapter_model.safetensors")
    actual = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    log = [json.loads(line) for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 151))  # no duplicated or missing steps
    assert not (tmp_path / "killed" / "checkpoints").exists()


def test_resume_without_a_checkpoint_says_it_starts_over(tmp_path, tiny_model_dir, caplog):
    config = tiny_run_config(tmp_path / "run", tiny_model_dir, max_steps=1)
    with caplog.at_level("WARNING", logger="emguard.training"):
        result = train(config, resume=True, progress=False)
    assert result.steps == 1 and result.resumed_from_step is None
    assert "holds no complete checkpoint of this run; starting from step 0" in caplog.text
