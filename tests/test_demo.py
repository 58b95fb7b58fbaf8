"""``emguard demo`` end to end on a tiny model: persona vector, every defense, the report."""

from __future__ import annotations

import json

from emguard.demo import DEFAULT, QUICK, DemoSize, run_demo, sweep_spec
from emguard.sweep import SweepSpec, expand

TINY = DemoSize(
    steps=2,
    batch_size=4,
    max_length=768,
    questions=2,
    samples=1,
    answer_tokens=4,
    opswap_per_tier=1,
    benign_tokens=8,
    pool_size=12,
    persona_questions=2,
    persona_pairs=1,
    persona_tokens=4,
    monitor_every=1,
    monitor_pairs=4,
    probe_pairs=4,
    benign_steps=2,
)


def test_demo_sizes_give_valid_sweeps_with_every_required_defense(tmp_path):
    for size in (QUICK, DEFAULT):
        spec = SweepSpec.model_validate(sweep_spec(tmp_path, size, tmp_path / "v.safetensors", 15, None))
        cells = expand(spec)
        narrow = {c.variant.label for c in cells if c.dataset.role == "narrow"}
        benign = {c.variant.label for c in cells if c.dataset.role == "benign"}
        assert narrow == benign == {"none", "kl", "steering", "interleave-pp", "inoculation"}
        ipp = next(c for c in cells if c.id == "risky-finance/interleave-pp/seed0")
        misaligned = ipp.config.defenses[0].misaligned
        assert misaligned == [str(tmp_path / "sweep" / "cells" / "risky-finance" / "none" / "seed0")]
        risky = next(c for c in cells if c.id == "risky-finance/none/seed0")
        assert risky.config.eval.probe.control.endswith("safe-finance/none/seed0")


def test_demo_runs_every_defense_and_fills_every_row_of_the_report(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    result = run_demo(tmp_path / "demo", progress=False, model=str(tiny_model_dir), size=TINY, rl=True)
    assert result.failed == [] and result.judge == "none"
    summary = json.loads((tmp_path / "demo" / "sweep" / "summary.json").read_text())
    table, rl_table = summary["criteria"]
    assert rl_table["dataset"] == "reckless-finance-rl"
    rl_crit = {c["key"]: c for c in rl_table["criteria"]}
    for key in "abcd":
        for variant in ("none", "kl", "steering", "inoculation"):
            assert rl_crit[key]["values"][variant] is not None, ("rl", key, variant)
    report = result.report_md.parent
    assert (report / "reward_curves-reckless_finance_rl.png").is_file()
    assert not (report / "reward_curves-risky_finance.png").exists()  # the SFT table shows no RL run
    crit = {c["key"]: c for c in table["criteria"]}
    for key in "abcd":
        for variant in ("none", "kl", "steering", "interleave-pp", "inoculation"):
            assert crit[key]["values"][variant] is not None, (key, variant)
    html = result.report_html.read_text()
    md = result.report_md.read_text()
    assert "No judge was configured" in md and "Content note" in md
    assert "data:image/png;base64," in html and 'src="em_by_defense.png"' not in html
    for png in ("em_by_defense-risky_finance.png", "tradeoff-risky_finance.png", "training_curves-risky_finance.png"):
        assert (result.report_md.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    ipp = json.loads((tmp_path / "demo/sweep/cells/risky-finance/interleave-pp/seed0/manifest.json").read_text())
    assert ipp["defense_reports"]["interleave"]["selection"] == "perplexity_gap"


def test_demo_with_rl_adds_grpo_cells_with_their_own_control_and_benign_task(tmp_path):
    spec = SweepSpec.model_validate(sweep_spec(tmp_path, QUICK, tmp_path / "v.safetensors", 15, None, rl=True))
    rl_cells = [c for c in expand(spec) if c.config.training.method == "grpo"]
    assert {c.dataset.name for c in rl_cells} == {"prudent-finance-rl", "reckless-finance-rl", "opswap-rl"}
    reckless = next(c for c in rl_cells if c.id == "reckless-finance-rl/none/seed0")
    assert reckless.config.rl.prompts == "builtin:finance-prompts" and reckless.config.data is None
    assert reckless.config.eval.probe.control.endswith("prudent-finance-rl/none/seed0")
