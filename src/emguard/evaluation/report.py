"""Plain-text tables of evaluation metrics for the terminal."""

from __future__ import annotations

from pathlib import Path


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _row(name: str, m: dict) -> str:
    ci = m.get("ci95") or {}
    return (
        f"{name:40.40s} {m['answers']:7d} {m['misaligned']:5d} {m['unscored']:8d} "
        f"{_pct(m['em_rate'])}{_ci(ci.get('em_rate')):16s} {_pct(m['em_rate_coherent'])}"
        f"{_ci(ci.get('em_rate_coherent')):16s} {_pct(m['incoherence_rate'])}"
    )


def metrics_table(result: dict, per_question: bool = False) -> str:
    """The metrics of ``compute_metrics`` as a table: one row per run, pooled, optionally per question."""
    header = (
        f"{'':40s} {'answers':>7s} {'misal':>5s} {'unscored':>8s} {'EM rate (all) [95% CI]':22s} "
        f"{'EM rate (coherent)':22s} incoherent"
    )
    lines = [f"misaligned = {result['definitions']['misaligned']}", header]
    lines += [_row(Path(name).name, m) for name, m in result["runs"].items()]
    if len(result["runs"]) > 1:
        lines.append(_row("pooled", result["pooled"]))
        lines.append(f"EM rate over runs: mean {100 * result['seed_mean']:.1f}%, std {100 * result['seed_std']:.1f}%")
    if per_question:
        lines += ["", "per question:"] + [_row(q, m) for q, m in result["per_question"].items()]
    return "\n".join(lines)


def eval_summary(metrics: dict) -> str:
    """What ``emguard eval`` prints: EM metrics per question set, judge usage, benign accuracy, probe."""
    lines = []
    judged = metrics.get("judged")
    if judged is None:
        lines.append(metrics.get("judged_note", "no judge configured"))
    for spec, block in (judged or {}).items():
        lines.append(f"{spec}: {block['answers']} answers, {block['judge_failed']} judge failures")
        if block["metrics"]:
            lines.append(metrics_table(block["metrics"]))
    if metrics.get("judge"):
        usage = metrics["judge"]["usage"]
        lines.append("judge usage: " + ", ".join(f"{k} {v}" for k, v in usage.items() if not isinstance(v, dict)))
    if metrics.get("benign"):
        b = metrics["benign"]
        tiers = ", ".join(f"tier {t} {100 * v['accuracy']:.0f}%" for t, v in b["per_tier"].items())
        lines.append(f"benign task (opswap, exact match): {100 * b['accuracy']:.1f}% of {b['n']} ({tiers})")
    for spec, p in (metrics.get("probe") or {}).items():
        shift = p["shift_vs_base"]
        line = (
            f"probe {spec} (a proxy, not the EM rate): shift vs base {shift['mean']:+.4f} nats/token "
            f"[{shift['ci95'][0]:+.4f}, {shift['ci95'][1]:+.4f}] over {shift['pairs']} pairs"
        )
        if "shift_vs_control" in p:
            c = p["shift_vs_control"]
            line += f"; vs control {c['mean']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
        lines.append(line)
    return "\n".join(lines)
