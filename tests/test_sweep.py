"""``emguard sweep``: grid expansion, cell references, resume after a failure and after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from emguard.cli import main
from emguard.errors import ConfigError
from emguard.sweep import SweepSpec, expand, load_sweep, run_sweep


def spec_data(tmp_path: Path, model_dir: Path, **extra) -> dict:
    data = {
        "output_dir": str(tmp_path / "sweep"),
        "base": {
            "model": str(model_dir),
            "data": {"max_length": 128, "max_examples": 8},
            "lora": {"r": 4, "alpha": 8},
            "training": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0},
            "eval": {"questions": [], "probe": {"pairs": ["builtin:general"]}, "bootstrap": 50},
        },
        "datasets": [
            {"name": "control", "train": "builtin:opswap", "role": "control", "defenses": ["none"]},
            {
                "name": "narrow",
                "train": "builtin:opswap",
                "role": "narrow",
                "set": {"eval.probe.control": "{cell:control/none}"},
            },
        ],
        "defenses": [
            {"label": "none", "defenses": [{"name": "none"}]},
            {"label": "kl", "defenses": [{"name": "kl"}], "strength": {"key": "lambda", "values": [0.1, 1.0]}},
        ],
        "seeds": [0, 1],
    }
    data.update(extra)
    return data


def statuses(root: Path) -> dict[str, str]:
    return {c["id"]: c["status"] for c in json.loads((root / "index.json").read_text())["cells"]}


def test_expand_builds_the_grid_in_run_order_with_strengths_and_references(tmp_path):
    cells = expand(SweepSpec.model_validate(spec_data(tmp_path, tmp_path / "model")))
    assert [c.id for c in cells] == [
        "control/none/seed0",
        "narrow/none/seed0",
        "narrow/kl-0.1/seed0",
        "narrow/kl-1/seed0",
        "control/none/seed1",
        "narrow/none/seed1",
        "narrow/kl-0.1/seed1",
        "narrow/kl-1/seed1",
    ]
    kl = cells[3].config
    assert kl.defenses[0].lambda_ == 1.0 and kl.training.seed == 0 and kl.data.train == "builtin:opswap"
    assert kl.output_dir == kl.eval.adapter == str(tmp_path / "sweep/cells/narrow/kl-1/seed0")
    assert kl.eval.probe.control == str(tmp_path / "sweep/cells/control/none/seed0")
    assert cells[5].config.eval.probe.control == str(tmp_path / "sweep/cells/control/none/seed1")
    assert (cells[2].variant.defense, cells[2].variant.strength_key, cells[2].variant.strength) == ("kl", "lambda", 0.1)


def test_bad_sweeps_fail_before_anything_is_written(tmp_path):
    data = spec_data(tmp_path, tmp_path / "model")
    data["datasets"][0]["set"] = {"eval.probe.control": "{cell:narrow/none}"}  # runs later: not allowed
    with pytest.raises(ConfigError, match=r"control/none/seed0: \{cell:narrow/none\} names no cell that runs before"):
        run_sweep(SweepSpec.model_validate(data), progress=False)
    data = spec_data(tmp_path, tmp_path / "model")
    data["defenses"][1]["defenses"][0]["direction"] = "sideways"  # every cell is validated first
    with pytest.raises(ConfigError, match="sweep cell narrow/kl-0.1/seed0: invalid configuration"):
        run_sweep(SweepSpec.model_validate(data), progress=False)
    assert not (tmp_path / "sweep").exists()
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump({**spec_data(tmp_path, tmp_path / "m"), "defenses": [{"label": "a b", "defenses": []}]})
    )
    with pytest.raises(ConfigError, match=r"defenses\.0\.label"):
        load_sweep(path)
    assert main(["sweep", str(path)]) == 2


def test_a_failed_cell_is_recorded_the_rest_runs_and_a_rerun_retries_only_it(tmp_path, tiny_model_dir, monkeypatch):
    data = spec_data(tmp_path, tiny_model_dir, seeds=[0])
    data["defenses"] = data["defenses"][:1] + [{"label": "kl", "defenses": [{"name": "kl"}]}]
    spec = SweepSpec.model_validate(data)
    from emguard import training

    real_train = training.train

    def flaky(config, **kw):
        if "/kl/" in config.output_dir:
            raise RuntimeError("simulated crash")
        return real_train(config, **kw)

    monkeypatch.setattr(training, "train", flaky)
    result = run_sweep(spec, progress=False)
    root = tmp_path / "sweep"
    assert result.failed == ["narrow/kl/seed0"]
    assert statuses(root) == {
        "control/none/seed0": "finished",
        "narrow/none/seed0": "finished",
        "narrow/kl/seed0": "failed",
    }
    record = next(c for c in json.loads((root / "index.json").read_text())["cells"] if c["id"] == "narrow/kl/seed0")
    assert "simulated crash" in record["error"] and "simulated crash" in Path(record["traceback"]).read_text()
    finished = root / "cells/narrow/none/seed0/adapter/adapter_model.safetensors"
    mtime = finished.stat().st_mtime_ns

    monkeypatch.setattr(training, "train", real_train)
    result = run_sweep(spec, progress=False)
    assert result.failed == [] and result.skipped == 2 and result.finished == 3
    assert set(statuses(root).values()) == {"finished"}
    assert finished.stat().st_mtime_ns == mtime  # not retrained
    summary = json.loads((root / "summary.json").read_text())
    assert {(g["dataset"], g["variant"]) for g in summary["groups"]} == {
        ("control", "none"),
        ("narrow", "none"),
        ("narrow", "kl"),
    }
    assert "Four criteria" in (root / "summary.md").read_text()


def test_a_killed_sweep_resumes_where_it_stopped(tmp_path, tiny_model_dir):
    data = spec_data(tmp_path, tiny_model_dir, seeds=[0])
    data["base"]["training"].update(max_steps=12, save_steps=3)  # long enough to be killed inside cell 2
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    root = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "emguard.cli", "sweep", str(path), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = root / "cells/narrow/none/seed0/checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(checkpoint.glob("checkpoint-*/emguard_checkpoint_complete")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert statuses(root)["control/none/seed0"] == "finished"
    assert statuses(root)["narrow/none/seed0"] == "running"  # killed: the index says where
    done = root / "cells/control/none/seed0/adapter/adapter_model.safetensors"
    mtime = done.stat().st_mtime_ns

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert set(statuses(root).values()) == {"finished"}
    assert done.stat().st_mtime_ns == mtime
    manifest = json.loads((root / "cells/narrow/none/seed0/manifest.json").read_text())
    assert manifest["resumed_from_step"] is not None and manifest["train"]["steps"] == 12
