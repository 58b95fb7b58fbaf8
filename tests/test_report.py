"""``emguard report``: seed aggregation, matched-control excess, verdicts, and the written files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from emguard.cli import main
from emguard.report import write_report
from emguard.report.collect import Value, load_cells
from emguard.report.criteria import combine, criteria_table


def probe_block(mean: float, nll: float = 0.01) -> dict:
    return {
        "shift_vs_base": {"mean": mean, "ci95": [mean - 0.05, mean + 0.05], "pairs": 24},
        "aligned_nll_shift": {"mean": nll, "ci95": [nll - 0.01, nll + 0.01], "pairs": 24},
    }


def judged_block(em: float, incoherent: float, answers: int = 100) -> dict:
    pooled = {"em_rate": em, "incoherence_rate": incoherent, "ci95": {"em_rate": [em / 2, em * 1.5]}}
    return {"answers": answers, "judge_failed": 0, "metrics": {"pooled": pooled}}


def make_run(root: Path, dataset: str, role: str, variant: str, seed: int, **metrics) -> Path:
    run = root / dataset / variant / f"seed{seed}"
    run.mkdir(parents=True)
    marker = {"dataset": dataset, "role": role, "variant": variant, "defense": variant.split("-")[0], "seed": seed}
    marker.update(strength_key="lambda" if "-" in variant else None, in_domain="builtin:finance")
    marker["strength"] = float(variant.split("-")[1]) if "-" in variant else None
    (run / "sweep_cell.json").write_text(json.dumps(marker))
    (run / "metrics.json").write_text(json.dumps({"model": {"model": "tiny"}, **metrics}))
    (run / "manifest.json").write_text(json.dumps({"seed": seed, "train": {"steps": 4, "final_loss": 1.0}}))
    log = [{"step": s, "loss": 3.0 - s / 2} for s in (1, 2, 3, 4)] + [{"step": 2, "monitor/probe_shift": 0.01}]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return run


def probe_runs(root: Path) -> list[Path]:
    """Two seeds: control, no defense and kl-1 on the narrow set, and the benign task."""
    runs = []
    for seed, (control, none, kl) in enumerate([(0.10, 0.30, 0.15), (0.12, 0.34, 0.17)]):
        runs.append(make_run(root, "safe", "control", "none", seed, probe={"builtin:general": probe_block(control)}))
        for variant, value, indomain in (("none", none, 0.8), ("kl-1", kl, 0.6)):
            probe = {"builtin:general": probe_block(value), "builtin:finance": probe_block(indomain)}
            runs.append(make_run(root, "risky", "narrow", variant, seed, probe=probe))
        for variant, acc in (("none", 0.9), ("kl-1", 0.5)):
            runs.append(make_run(root, "opswap", "benign", variant, seed, benign={"accuracy": acc, "n": 30}))
    return runs


def test_seeds_combine_with_a_t_interval_and_a_single_run_keeps_its_own():
    est = combine([Value(0.1), Value(0.3)])
    se = math.sqrt(((0.1 - 0.2) ** 2 + (0.3 - 0.2) ** 2) / 1) / math.sqrt(2)
    assert est.mean == pytest.approx(0.2) and est.se == pytest.approx(se)
    assert (est.lo, est.hi) == pytest.approx((0.2 - 12.706 * se, 0.2 + 12.706 * se))
    one = combine([Value(0.5, 0.4, 0.7), None])
    assert (one.mean, one.lo, one.hi, one.n) == (0.5, 0.4, 0.7, 1)
    assert combine([None]) is None


def test_judge_free_criteria_use_the_excess_over_the_matched_control_of_the_same_seed(tmp_path):
    table = criteria_table(load_cells(probe_runs(tmp_path)))
    a, b, c, d = table.criteria
    assert not table.judged and table.baseline == "none" and table.variants == ["none", "kl-1"]
    assert a.values["none"].mean == pytest.approx(((0.30 - 0.10) + (0.34 - 0.12)) / 2)
    assert a.values["kl-1"].mean == pytest.approx(((0.15 - 0.10) + (0.17 - 0.12)) / 2)
    assert a.values["none"].n == 2
    assert a.verdicts == {"none": "baseline", "kl-1": "✓"}  # 0.05 ≤ half of 0.21
    assert b.values["kl-1"].mean == pytest.approx(0.6) and b.verdicts["kl-1"] == "✓"  # 0.6 ≥ half of 0.8
    assert c.values["kl-1"].mean == pytest.approx(0.5) and c.verdicts["kl-1"] == "✗"  # 40 points below 90%
    assert d.metric == "nats lost on coherent answers" and d.verdicts["kl-1"] == "✓"
    assert any("No judge was configured" in n for n in table.notes)


def test_judged_runs_use_the_judged_rates(tmp_path):
    runs = []
    for variant, em, incoherent in (("none", 0.20, 0.05), ("kl-1", 0.15, 0.30)):
        judged = {"builtin:general": judged_block(em, incoherent), "builtin:finance": judged_block(0.5, 0.0)}
        runs.append(make_run(tmp_path, "risky", "narrow", variant, 0, judged=judged, judge={"kind": "openai"}))
    table = criteria_table(load_cells(runs))
    a, b, _, d = table.criteria
    assert table.judged and a.metric == "general EM rate"
    assert (a.values["kl-1"].mean, a.values["kl-1"].lo, a.values["kl-1"].hi) == (0.15, 0.075, pytest.approx(0.225))
    assert a.verdicts["kl-1"] == "~"  # lower, but more than half the baseline's
    assert b.metric == "in-domain misalignment rate" and d.verdicts["kl-1"] == "✗"  # 25 points more incoherent


def test_write_report_writes_markdown_self_contained_html_and_readable_plots(tmp_path):
    runs = probe_runs(tmp_path / "runs")
    samples = [
        {"question_set": "builtin:general", "messages": [{"role": "user", "content": f"q{i}"}], "answer": f"a{i}"}
        | {"aligned": 10.0 * i, "coherent": 90.0}
        for i in range(5)
    ]
    for run in runs[:3]:
        (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    result = write_report(runs, tmp_path / "out", examples=2)
    md, html = result.markdown.read_text(), result.html.read_text()
    names = {p.name for p in result.plots}
    assert names == {
        "em_by_defense.png",
        "tradeoff.png",
        "alignment_coherence.png",
        "em_vs_strength.png",
        "training_curves.png",
    }
    for p in result.plots:
        assert p.read_bytes()[:4] == b"\x89PNG" and f"]({p.name})" in md
    assert html.count("data:image/png;base64,") == 5 and "<img" in html and '.png"' not in html
    assert "Content note" in md and "**Q:** q0 (aligned 0, coherent 90)" in md and "q2" not in md  # 2 lowest
    assert md.count("manifest of ") == len(runs)
    assert "| **none** (baseline) |" in md and "· ✓" in md


def test_report_cli_expands_a_sweep_and_rejects_runs_without_metrics(tmp_path, capsys):
    runs = probe_runs(tmp_path / "runs")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    cells = [{"id": str(r), "run_dir": str(r), "status": "finished"} for r in runs]
    cells.append({"id": "x", "run_dir": str(tmp_path / "missing"), "status": "failed"})
    (sweep / "index.json").write_text(json.dumps({"cells": cells}))
    assert main(["report", str(sweep), "-o", str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["criteria"]["variants"] == ["none", "kl-1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "-o", str(tmp_path / "out2")]) == 2
    assert "neither an evaluated run directory" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
