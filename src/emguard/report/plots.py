"""The report's PNG plots (matplotlib, no display needed). Each function returns the file or None
when the runs hold nothing to plot."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from emguard.report.collect import CellResult  # noqa: E402
from emguard.report.criteria import CriteriaTable, Criterion, Estimate  # noqa: E402

MONITOR_KEY = "monitor/probe_shift"
DPI = 110
BASE_COLOR, DEFENSE_COLOR = "#b23a48", "#3a6ea5"
HATCHES = ("", "//", "..")
STRENGTH_NAMES = {"lambda": "λ", "alpha": "α", "fraction": "interleave fraction"}


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _err(est: Estimate) -> tuple[float, float]:
    if est.lo is None or est.hi is None:
        return (0.0, 0.0)
    return (max(est.mean - est.lo, 0.0), max(est.hi - est.mean, 0.0))


def _axis_label(c: Criterion) -> str:
    return f"{c.metric} ({'%' if c.unit == 'share of answers' else c.unit})"


def _scale(c: Criterion) -> float:
    return 100.0 if c.unit == "share of answers" else 1.0


def em_by_defense(table: CriteriaTable, path: Path) -> Path | None:
    """Bar chart of criterion (a) per defense with its 95% interval: one bar per broad measure, one
    panel per unit (a judged EM rate and probe shifts are never drawn on one axis)."""
    crits = [c for c in table.criteria if c.key == "a" and any(e is not None for e in c.values.values())]
    if not crits:
        return None
    panels: dict[str, list[Criterion]] = {}
    for crit in crits:
        panels.setdefault(crit.unit, []).append(crit)
    variants = [v for v in table.variants if any(c.values.get(v) is not None for c in crits)]
    width_in = max(6.5, 1.1 * len(variants) * max(1, max(len(p) for p in panels.values()) / 1.5) + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(width_in * len(panels), 4.4), squeeze=False)
    for ax, group in zip(axes.flat, panels.values(), strict=True):
        _em_bars(ax, group, variants, table.baseline)
    fig.suptitle("(a) General EM per defense (bars: mean; whiskers: 95% interval)", fontsize=11)
    return _save(fig, path)


def _em_bars(ax: plt.Axes, crits: list[Criterion], variants: list[str], baseline: str | None) -> None:
    k, width = _scale(crits[0]), 0.8 / len(crits)
    for j, crit in enumerate(crits):
        xs = [i + (j - (len(crits) - 1) / 2) * width for i in range(len(variants))]
        ests = [crit.values.get(v) for v in variants]
        errs = [_err(e) if e is not None else (0.0, 0.0) for e in ests]
        ax.bar(
            xs,
            [k * e.mean if e is not None else 0.0 for e in ests],
            width=width,
            yerr=[[k * lo for lo, _ in errs], [k * hi for _, hi in errs]],
            capsize=4,
            color=[BASE_COLOR if v == baseline else DEFENSE_COLOR for v in variants],
            alpha=1.0 - 0.35 * j,
            hatch=HATCHES[j % len(HATCHES)],
            edgecolor="white",
            label=crit.metric,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(range(len(variants))), variants, rotation=20, ha="right")
    ax.set_xlabel("defense")
    if len(crits) == 1:
        ax.set_ylabel(_axis_label(crits[0]))
    else:
        ax.set_ylabel(f"{crits[0].metric.split(',')[0]} ({crits[0].unit})")
        ax.legend(fontsize=8)
    ax.set_title(crits[0].metric if len(crits) == 1 else "one bar per probe set", fontsize=10)


def tradeoff(table: CriteriaTable, path: Path) -> Path | None:
    """Criterion (a) against (b) per defense: down and right is what a provider wants."""
    a, b = table.first("a"), table.first("b")
    if a is None or b is None:
        return None
    items = [(v, a.values.get(v), b.values.get(v)) for v in table.variants]
    items = [(v, x, y) for v, x, y in items if x is not None and y is not None]
    if not items:
        return None
    ka, kb = _scale(a), _scale(b)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for v, x, y in items:
        color = BASE_COLOR if v == table.baseline else DEFENSE_COLOR
        ex, ey = _err(x), _err(y)
        ax.errorbar(
            kb * y.mean,
            ka * x.mean,
            xerr=[[kb * ey[0]], [kb * ey[1]]],
            yerr=[[ka * ex[0]], [ka * ex[1]]],
            fmt="o",
            color=color,
            capsize=3,
        )
        ax.annotate(v, (kb * y.mean, ka * x.mean), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel(f"(b) {_axis_label(b)}\n→ narrow task learned")
    ax.set_ylabel(f"(a) {_axis_label(a)}\n↑ more broad EM")
    ax.set_title("Trade-off per defense: broad EM vs narrow learning")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def alignment_coherence(cells: list[CellResult], variants: list[str], path: Path) -> Path | None:
    """Judged alignment × coherence of every general answer, one panel per defense."""
    points = {}
    for v in variants:
        rows = [
            r
            for c in cells
            if c.role == "narrow" and c.variant == v
            for r in c.samples()
            if r.get("question_set") == c.general and r.get("aligned") is not None and r.get("coherent") is not None
        ]
        if rows:
            points[v] = rows
    if not points:
        return None
    cols = min(3, len(points))
    rows_n = math.ceil(len(points) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.6 * rows_n), squeeze=False)
    for ax, (v, rows) in zip(axes.flat, points.items(), strict=False):
        ax.axvspan(50, 100, ymin=0, ymax=0.3, color=BASE_COLOR, alpha=0.12, label="misaligned region")
        ax.scatter([r["coherent"] for r in rows], [r["aligned"] for r in rows], s=12, alpha=0.6, color=DEFENSE_COLOR)
        ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="coherent (judge score 0–100)", ylabel="aligned (0–100)")
        ax.set_title(f"{v} ({len(rows)} answers)")
    for ax in list(axes.flat)[len(points) :]:
        ax.axis("off")
    fig.suptitle("Judged alignment × coherence of general answers per defense")
    return _save(fig, path)


def em_vs_strength(cells: list[CellResult], table: CriteriaTable, path: Path) -> Path | None:
    """Criterion (a) against the swept strength, one panel per swept defense."""
    swept: dict[str, list[tuple[float, str, str]]] = {}
    for c in cells:
        if c.role == "narrow" and c.strength is not None:
            swept.setdefault(c.defense, [])
            entry = (float(c.strength), c.variant, c.strength_key or "strength")
            if entry not in swept[c.defense]:
                swept[c.defense].append(entry)
    if not swept:
        return None
    crit = table.first("a")
    if crit is None:
        return None
    k = _scale(crit)
    base = crit.values.get(table.baseline) if table.baseline else None
    fig, axes = plt.subplots(1, len(swept), figsize=(4.5 * len(swept), 3.8), squeeze=False)
    for ax, (defense, entries) in zip(axes.flat, sorted(swept.items()), strict=True):
        entries.sort()
        pts = [(s, crit.values.get(v)) for s, v, _ in entries]
        pts = [(s, e) for s, e in pts if e is not None]
        if pts:
            errs = [_err(e) for _, e in pts]
            ax.errorbar(
                [s for s, _ in pts],
                [k * e.mean for _, e in pts],
                yerr=[[k * lo for lo, _ in errs], [k * hi for _, hi in errs]],
                fmt="o-",
                capsize=4,
                color=DEFENSE_COLOR,
            )
        if base is not None:
            ax.axhline(k * base.mean, color=BASE_COLOR, linestyle="--", label=f"{table.baseline} (no defense)")
            ax.legend(fontsize=8)
        key = entries[0][2]
        ax.set_xlabel(f"{defense}: {STRENGTH_NAMES.get(key, key)}")
        ax.set_ylabel(_axis_label(crit))
        ax.set_title(f"EM vs strength: {defense}")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def training_curves(cells: list[CellResult], variants: list[str], path: Path) -> Path | None:
    """Training loss per defense (solid) with the in-training EM monitor (dashed, right axis)."""
    panels = [(v, [c for c in cells if c.role == "narrow" and c.variant == v and c.train_log]) for v in variants]
    panels = [(v, cs) for v, cs in panels if cs]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.4 * cols, 3.4 * rows_n), squeeze=False)
    # One monitor scale for every panel, zero included, so that panels compare and noise looks small.
    shifts = [r[MONITOR_KEY] for _, cs in panels for c in cs for r in c.train_log if MONITOR_KEY in r]
    span = (min(0.0, *shifts), max(0.0, *shifts)) if shifts else (0.0, 1.0)
    pad = 0.1 * (span[1] - span[0] or 1.0)
    for ax, (v, cs) in zip(axes.flat, panels, strict=False):
        twin = None
        for c in cs:
            loss = [(r["step"], r["loss"]) for r in c.train_log if "loss" in r]
            ax.plot(*zip(*loss, strict=True), color=DEFENSE_COLOR, alpha=0.8, label=f"loss seed {c.seed}")
            mon = [(r["step"], r[MONITOR_KEY]) for r in c.train_log if MONITOR_KEY in r]
            if mon:
                twin = twin or ax.twinx()
                twin.plot(*zip(*mon, strict=True), "o--", color=BASE_COLOR, alpha=0.8, label=f"monitor seed {c.seed}")
        ax.set(xlabel="optimizer step", ylabel="training loss (nats/token)", title=v)
        if twin is not None:
            twin.set_ylim(span[0] - pad, span[1] + pad)
            twin.set_ylabel("monitor: probe shift vs base (nats/token)", color=BASE_COLOR)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Training curves of the narrow fine-tunes (loss solid, EM monitor dashed)")
    return _save(fig, path)


ROLE_COLORS = {"narrow": BASE_COLOR, "control": "#5a8f29", "benign": DEFENSE_COLOR}


def reward_curves(cells: list[CellResult], variants: list[str], path: Path) -> Path | None:
    """GRPO runs: the mean reward per optimizer step, one panel per defense, a line per dataset and seed.

    A defense that stops the reward from rising (the paper's finding for steering and inoculation
    under RL) shows as a flat line beside the undefended run's rising one.
    """
    panels = [(v, [c for c in cells if c.variant == v and any("reward" in r for r in c.train_log)]) for v in variants]
    panels = [(v, cs) for v, cs in panels if cs]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.4 * cols, 3.4 * rows_n), squeeze=False, sharey=True)
    for ax, (v, cs) in zip(axes.flat, panels, strict=False):
        for c in cs:
            curve = [(r["step"], r["reward"]) for r in c.train_log if "reward" in r]
            color = ROLE_COLORS.get(c.role, "#444444")
            ax.plot(*zip(*curve, strict=True), color=color, alpha=0.8, label=f"{c.dataset} seed {c.seed}")
        ax.set(xlabel="optimizer step", ylabel="mean reward", title=v)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("GRPO reward per step (narrow red, control green, benign blue)")
    return _save(fig, path)
