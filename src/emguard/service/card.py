"""The safety card of a job and the release decision, from the job's metrics and the policy.

The customer's card holds what was measured and what was decided, with reasons; the provider's copy
(``safety_card.json`` in the run directory) adds the policy's thresholds, which customers never see.
"""

from __future__ import annotations

import html
from typing import Any

from emguard.service.policy import Policy

CARD_FILE = "safety_card.json"


def _mean(section: dict[str, Any] | None, key: str) -> float | None:
    value = (section or {}).get(key) or {}
    return value.get("mean")


def release_decision(policy: Policy, metrics: dict[str, Any]) -> tuple[bool, list[str]]:
    """(released, reasons the model is held); a measurement the policy needs but lacks holds the model."""
    r, reasons = policy.release, []
    probe = (metrics.get("probe") or {}).get(r.pairs)
    shift = _mean(probe, "shift_vs_base")
    if shift is None:
        reasons.append(f"no likelihood probe on {r.pairs}")
    elif shift > r.max_probe_shift:
        reasons.append(f"misaligned answers became more likely on {r.pairs} ({shift:+.3f} nats/token)")
    coherence = _mean(probe, "aligned_nll_shift")
    if r.max_coherence_loss is not None and coherence is not None and coherence > r.max_coherence_loss:
        reasons.append(f"coherent answers became less likely ({coherence:+.3f} nats/token)")
    for spec, judged in (metrics.get("judged") or {}).items():
        pooled = ((judged or {}).get("metrics") or {}).get("pooled") or {}
        rate = pooled.get("em_rate")
        if rate is None:
            reasons.append(f"the judge scored no answer on {spec}")
        elif rate > r.max_em_rate:
            reasons.append(f"judged EM rate {rate:.1%} on {spec} ({pooled['misaligned']}/{pooled['answers']} answers)")
    return not reasons, reasons


def safety_card(
    policy: Policy,
    *,
    job_id: str,
    model: str,
    screen: dict[str, Any] | None,
    defenses: list[dict[str, Any]],
    train: dict[str, Any],
    metrics: dict[str, Any] | None,
    released: bool | None,
    reasons: list[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the customer's card, the provider's card)."""
    probe = {
        spec: {
            "shift_vs_base": p.get("shift_vs_base"),
            "aligned_nll_shift": p.get("aligned_nll_shift"),
            "unit": "nats per answer token; shift > 0: misaligned answers became more likely",
        }
        for spec, p in ((metrics or {}).get("probe") or {}).items()
    }
    judged = {
        spec: ((j or {}).get("metrics") or {}).get("pooled")
        for spec, j in ((metrics or {}).get("judged") or {}).items()
    }
    card = {
        "object": "emguard.safety_card",
        "job": job_id,
        "model": model,
        "decision": None if released is None else ("released" if released else "held"),
        "reasons": reasons,
        "screen": None
        if screen is None
        else {"risk_score": screen["risk_score"], "decision": screen["decision"], "examples": screen["examples"]},
        "defenses": [d["name"] for d in defenses],
        "training": train,
        "evaluation": {"probe": probe, "judged_em": judged or None},
        "note": "The likelihood probe is a judge-free proxy measured on fixed answer pairs, not a rate of "
        "misaligned answers; a judged EM rate appears when the provider configured a judge.",
    }
    provider = {
        **card,
        "thresholds": {"release": policy.release.model_dump(), "screen": policy.screen.model_dump(mode="json")},
    }
    return card, provider


def card_html(card: dict[str, Any]) -> str:
    """The customer's card as a page: what was measured and decided, nothing of the provider's set-up
    (the full report, with the model's location and the judge, stays in the job's directory)."""
    e = html.escape

    def interval(value: dict[str, Any] | None) -> str:
        if not value:
            return "–"
        low, high = value.get("ci95") or (None, None)
        bounds = f" [{low:+.3f}, {high:+.3f}]" if low is not None else ""
        return f"{value['mean']:+.3f}{bounds} ({value.get('pairs', '?')} pairs)"

    rows = "".join(
        f"<tr><td>{e(spec)}</td><td>{interval(p.get('shift_vs_base'))}</td>"
        f"<td>{interval(p.get('aligned_nll_shift'))}</td></tr>"
        for spec, p in (card.get("evaluation", {}).get("probe") or {}).items()
    )
    judged = "".join(
        f"<li>{e(spec)}: {m['em_rate']:.1%} misaligned ({m['misaligned']}/{m['answers']} answers)</li>"
        for spec, m in (card.get("evaluation", {}).get("judged_em") or {}).items()
        if m and m.get("em_rate") is not None
    )
    screen = card.get("screen")
    reasons = "".join(f"<li>{e(r)}</li>" for r in card.get("reasons") or [])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>emguard safety report {e(card["job"])}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{border:1px solid #ccc;padding:.3em}}
table{{border-collapse:collapse}}</style></head><body>
<h1>emguard safety report</h1>
<p>Job {e(card["job"])}, base model {e(card["model"])}: <b>{e(str(card.get("decision") or "not decided"))}</b></p>
{f"<ul>{reasons}</ul>" if reasons else ""}
<h2>Before training</h2>
<p>{_screen_line(screen)}</p>
<p>Defenses applied: {e(", ".join(card.get("defenses") or []) or "none")}</p>
<h2>After training</h2>
<table><tr><th>probe pairs</th><th>shift from the base model (nats/token) [95%]</th>
<th>nats lost on coherent answers [95%]</th></tr>{rows}</table>
{f"<ul>{judged}</ul>" if judged else ""}
<p><small>{e(card.get("note", ""))}</small></p></body></html>
"""


def _screen_line(screen: dict[str, Any] | None) -> str:
    if not screen:
        return "No screen."
    if screen["risk_score"] is None:  # reinforcement prompts: no answers to screen
        return "Screen: not applicable (" + html.escape(screen["decision"]) + ")."
    return f"Screen: risk score {screen['risk_score']:+.2f} ({html.escape(screen['decision'])})"
