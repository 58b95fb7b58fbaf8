"""Every example config is valid and says how to reproduce it."""

from __future__ import annotations

from pathlib import Path

import pytest

from emguard.config import load_config
from emguard.defenses.registry import build_defenses

ALL = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
SWEEPS = [p for p in ALL if p.stem.startswith("sweep-")]
EXAMPLES = [p for p in ALL if p not in SWEEPS]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_example_sweep_is_valid_and_documented(path):
    from emguard.sweep import expand, load_sweep

    spec = load_sweep(path)
    cells = expand(spec)  # every cell's run config validates
    for cell in cells:
        build_defenses(cell.config.defenses)
    assert f"emguard sweep examples/{path.name}" in path.read_text()
    assert spec.output_dir == f"runs/{path.stem}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_is_valid_and_documented(path):
    config = load_config(path)
    build_defenses(config.defenses)  # composable as listed
    text = path.read_text()
    commands = ("train", "eval", "select", "persona extract")
    assert any(f"emguard {c} examples/{path.name}" in text for c in commands)
    assert config.output_dir == f"runs/{path.stem}"


def test_every_defense_has_an_example():
    from emguard.defenses.registry import available_defenses

    used = {d.name for path in EXAMPLES for d in load_config(path).defenses}
    assert used == set(available_defenses())
