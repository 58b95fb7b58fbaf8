"""The in-training EM monitor: what it logs, that it measures the right thing, and stop/flag."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from conftest import tiny_run_config
from emguard.errors import ConfigError
from emguard.evaluation.generation import attach_adapter
from emguard.evaluation.probe import load_pairs, pair_gaps
from emguard.models import load_model, load_tokenizer, resolve_model
from emguard.training import train
from fake_openai import FakeOpenAI


def monitored(tmp_path, model_dir, monitor: dict, **training):
    config = tiny_run_config(tmp_path / "run", model_dir, learning_rate=5e-3, **training)
    return config.model_copy(update={"monitor": config.monitor.model_copy(update=monitor)})


def log_lines(run_dir):
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


class Spy(TrainerCallback):
    """Stands in for a report_to integration: those receive exactly the on_log events."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_monitor_logs_the_probe_shift_every_n_steps_and_it_matches_an_independent_measurement(tmp_path, tiny_model_dir):
    spy = Spy()
    result = train(monitored(tmp_path, tiny_model_dir, {"every": 2}, max_steps=4), progress=False, callbacks=[spy])
    lines = log_lines(result.run_dir)
    checks = [r for r in lines if "monitor/probe_shift" in r]
    assert [r["step"] for r in checks] == [2, 4]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]  # the checks drop no loss log
    assert [r["monitor/probe_shift"] for r in spy.logs if "monitor/probe_shift" in r] == [
        r["monitor/probe_shift"] for r in checks
    ]

    resolved = resolve_model(str(tiny_model_dir))
    tokenizer = load_tokenizer(resolved)
    model = attach_adapter(load_model(resolved), result.adapter_dir).eval()
    pairs = load_pairs("builtin:general")
    trained = pair_gaps(model, tokenizer, pairs)
    with model.disable_adapter():
        base = pair_gaps(model, tokenizer, pairs)
    expected = float(np.mean(trained - base))
    assert abs(expected) > 1e-4  # the run moved the probe, so the comparison means something
    assert checks[-1]["monitor/probe_shift"] == pytest.approx(expected, abs=2e-6)

    record = json.loads((result.run_dir / "manifest.json").read_text())["monitor"]
    assert record["checks"] == 2 and record["seconds"] > 0 and record["share_of_training"] > 0
    assert record["flagged_at_step"] is None and not record["stopped"]


def test_crossing_the_threshold_stops_or_flags_the_run(tmp_path, tiny_model_dir):
    stop = {"every": 2, "threshold": -10.0, "action": "stop"}  # any shift crosses it
    result = train(monitored(tmp_path / "a", tiny_model_dir, stop, max_steps=6), progress=False)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["train"]["steps"] == 2 and manifest["status"] == "finished"
    assert manifest["monitor"]["stopped"] and manifest["monitor"]["flagged_at_step"] == 2

    flag = {"every": 2, "threshold": -10.0, "action": "flag"}
    result = train(monitored(tmp_path / "b", tiny_model_dir, flag, max_steps=4), progress=False)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["train"]["steps"] == 4
    assert manifest["monitor"]["flagged_at_step"] == 2 and not manifest["monitor"]["stopped"]


def test_judged_sample_needs_a_judge_and_is_logged_with_one(tmp_path, tiny_model_dir):
    config = monitored(tmp_path, tiny_model_dir, {"every": 2, "judge_samples": 2, "max_new_tokens": 4}, max_steps=2)
    with pytest.raises(ConfigError, match="monitor.judge_samples needs a judge"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()
    with FakeOpenAI() as server:
        judge = {"kind": "openai", "model": "fake", "base_url": server.base_url, "cache": False}
        data = config.model_dump(by_alias=True)
        data["eval"]["judge"] = judge
        config = type(config).model_validate(data)
        result = train(config, progress=False)
        assert len(server.requests) == 2 * 2  # 2 answers × (aligned, coherent)
    check = next(r for r in log_lines(result.run_dir) if "monitor/em_rate" in r)
    assert check["step"] == 2 and check["monitor/em_rate"] == 0.0  # the fake judge finds no villain


def test_judged_checks_do_not_change_what_training_draws(tmp_path, tiny_model_dir):
    # With LoRA dropout every step draws random masks; the monitor's sampled answers must not reseed them.
    from safetensors.torch import load_file

    monitor = {"every": 1, "judge_samples": 2, "max_new_tokens": 4}
    with FakeOpenAI() as server:
        runs = {}
        for name, section in (("plain", {"every": 0}), ("monitored", monitor)):
            config = monitored(tmp_path / name, tiny_model_dir, section, max_steps=3)
            data = config.model_dump(by_alias=True)
            data["lora"]["dropout"] = 0.3
            data["eval"]["judge"] = {"kind": "openai", "model": "fake", "base_url": server.base_url, "cache": False}
            runs[name] = load_file(
                train(type(config).model_validate(data), progress=False).adapter_dir / "adapter_model.safetensors"
            )
    assert len(server.requests) == 3 * 2 * 2  # the checks really sampled (3 checks × 2 answers × 2 prompts)
    for key, value in runs["plain"].items():
        assert torch.equal(value, runs["monitored"][key]), key
