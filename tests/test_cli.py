"""The command line: exit codes (0 ok, 2 bad input, 1 internal error), messages, --json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import chat, tiny_run_config, write_jsonl
from emguard.cli import main


def test_data_check_prints_one_line_per_problem_and_exits_2(tmp_path, capsys):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            chat("q", "a"),
            "{",
            {"messages": [{"role": "user", "content": "x"}]},
            {"messages": [{"role": "robot", "content": ""}]},
        ],
    )
    assert main(["data", "check", str(path)]) == 2
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines == [
        f"{path}:2: invalid JSON: Expecting property name enclosed in double quotes at column 2",
        f"{path}:3: no assistant turn: there is nothing to train on",
        f"{path}:4: messages[0]: unknown role 'robot' (allowed: system, user, assistant)",
        f"{path}:4: messages[0]: empty 'content'",
    ]
    assert f"{path}: 1 valid examples, 4 problems" in out.err


def test_data_check_ok_and_json(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), chat("q2", "a2")])
    assert main(["data", "check", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"ok": True, "files": [{"path": str(path), "valid_examples": 2, "problems": 0}], "problems": []}


def test_train_with_a_mistyped_key_exits_2_and_writes_nothing(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"output_dir": str(tmp_path / "run"), "data": {"train": "builtin:opswap"}, "trainig": {"max_steps": 1}}
        )
    )
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "trainig: unknown key (did you mean 'training'?)" in err
    assert not (tmp_path / "run").exists()


def test_train_bad_override_and_missing_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": "x", "data": {"train": "builtin:opswap"}}))
    assert main(["train", str(config), "--set", "training.batch_size=0"]) == 2
    assert "training.batch_size: Input should be greater than 0" in capsys.readouterr().err


def test_train_bad_data_exits_2_with_file_line(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), "nope"])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tmp_path / "run", tiny_model_dir, data=str(data)).to_yaml_dict()))
    assert main(["train", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: invalid JSON" in err and "nothing was trained" in err
    assert not (tmp_path / "run").exists()


def test_train_json_summary(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tmp_path / "run", tiny_model_dir).to_yaml_dict()))
    assert main(["train", str(config), "--quiet", "--json", "--set", "training.max_steps=2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["run_dir"] == str(tmp_path / "run") and not summary["skipped"]


def test_usage_errors_exit_2(capsys):
    assert main(["train"]) == 2
    assert main(["no-such-command"]) == 2


def test_console_script_is_installed():
    exe = shutil.which("emguard", path=str(Path(sys.executable).parent))
    assert exe, "the emguard console script is not installed beside this Python (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "data", "train"):
        assert command in out
