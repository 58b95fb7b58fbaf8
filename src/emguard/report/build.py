"""``emguard report RUN_DIR... -o OUT``: report.md, report.html (self-contained) and PNG plots."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emguard.fsio import atomic_write_text
from emguard.report import plots
from emguard.report.collect import CellResult, load_cells
from emguard.report.criteria import CriteriaTable, criteria_tables, seed_summary
from emguard.report.render import (
    Details,
    Heading,
    Image,
    Para,
    Pre,
    Table,
    criteria_blocks,
    criteria_title,
    summary_blocks,
    to_html,
    to_markdown,
)
from emguard.rundir import now

CONTENT_NOTE = (
    "Content note: the answers below were written by fine-tuned models, some of them trained to give "
    "harmful advice. They may be reckless, hostile or offensive. They are shown so that you can judge the "
    "defenses yourself; nothing here is advice."
)
ANSWER_CHARS = 700


@dataclass
class ReportResult:
    markdown: Path
    html: Path
    plots: list[Path] = field(default_factory=list)
    tables: list[CriteriaTable] = field(default_factory=list)  # one per narrow dataset

    def summary(self) -> dict[str, Any]:
        return {
            "markdown": str(self.markdown),
            "html": str(self.html),
            "plots": [str(p) for p in self.plots],
            "criteria": [t.to_dict() for t in self.tables],
        }


def write_report(run_dirs: list[Path], out: Path, examples: int = 3, title: str = "emguard report") -> ReportResult:
    """Read the evaluated run directories and write the report into ``out``.

    Each narrow dataset gets its own criteria table, plots and example answers (its runs against
    its own matched control); the benign-task runs appear in every table.

    Raises:
        EmguardError: A run directory holds no evaluated run (nothing is written then).
    """
    cells = load_cells([Path(d) for d in run_dirs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = criteria_tables(cells)
    several = len(tables) > 1
    criteria, plot_blocks, example_blocks, images = [], [], [], []
    suffixes: set[str] = set()
    for number, table in enumerate(tables, start=1):
        methods = {c.method for c in cells if c.role == "narrow" and c.dataset == table.dataset}
        # its narrow runs, and the controls and benign runs of the same method (SFT or GRPO)
        mine = [c for c in cells if c.dataset == table.dataset or (c.role != "narrow" and c.method in methods)]
        mine = mine if methods else [c for c in cells if c.role != "narrow"]
        suffix = f"-{_file_safe(table.dataset or 'none')}" if several else ""
        suffix = f"{suffix}-{number}" if suffix in suffixes else suffix  # two names, one file-safe form
        suffixes.add(suffix)
        made = _plots(table, mine, out, suffix)
        images += [path for _, path in made]
        heading = criteria_title(table, several)
        criteria += [Heading(heading), *criteria_blocks(table)]
        if several:
            plot_blocks.append(Heading(f"{table.dataset}", 3))
            example_blocks.append(Heading(f"{table.dataset}", 3))
        plot_blocks += [Image(path, _ALT[kind]) for kind, path in made]
        example_blocks += _example_blocks(mine, table.variants, examples)
    blocks = [
        Heading(title, 1),
        Para(_provenance(cells)),
        *criteria,
        Heading("Plots"),
        *plot_blocks,
        Heading("Per dataset and defense, seeds aggregated"),
        *summary_blocks(seed_summary(cells)),
        Heading("Example answers per defense"),
        Para(CONTENT_NOTE, note=True),
        *example_blocks,
        Heading("Runs and their manifests"),
        *_manifest_blocks(cells),
    ]
    md, page = out / "report.md", out / "report.html"
    atomic_write_text(md, to_markdown(blocks, image_dir=out) + "\n")
    atomic_write_text(page, to_html(blocks, title))
    return ReportResult(md, page, images, tables)


def _plots(table: CriteriaTable, cells: list[CellResult], out: Path, suffix: str) -> list[tuple[str, Path]]:
    """The plots of one criteria table that have something to show: (kind, file)."""
    made = [
        ("em_by_defense", plots.em_by_defense(table, out / f"em_by_defense{suffix}.png")),
        ("tradeoff", plots.tradeoff(table, out / f"tradeoff{suffix}.png")),
        (
            "alignment_coherence",
            plots.alignment_coherence(cells, table.variants, out / f"alignment_coherence{suffix}.png"),
        ),
        ("em_vs_strength", plots.em_vs_strength(cells, table, out / f"em_vs_strength{suffix}.png")),
        ("training_curves", plots.training_curves(cells, table.variants, out / f"training_curves{suffix}.png")),
        ("reward_curves", plots.reward_curves(cells, table.variants, out / f"reward_curves{suffix}.png")),
    ]
    return [(kind, path) for kind, path in made if path is not None]


def _file_safe(name: str) -> str:
    """A dataset name as part of a file name (a run trained on a file has its path as dataset name)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("._") or "dataset"


_ALT = {
    "em_by_defense": "General EM per defense with 95% intervals",
    "tradeoff": "Broad EM against narrow learning per defense",
    "alignment_coherence": "Judged alignment against coherence per defense",
    "em_vs_strength": "EM against defense strength",
    "training_curves": "Training loss and in-training EM monitor per defense",
    "reward_curves": "GRPO mean reward per step per defense",
}


def _provenance(cells: list[CellResult]) -> str:
    roles = {r: sum(1 for c in cells if c.role == r) for r in ("narrow", "control", "benign")}
    judges = sorted({_judge_name(c) for c in cells if c.role == "narrow"})
    models = sorted({str((c.metrics.get("model") or {}).get("model")) for c in cells})
    return (
        f"Generated {now()} from {len(cells)} runs ({roles['narrow']} narrow, {roles['control']} matched control, "
        f"{roles['benign']} benign-task). Model: {', '.join(models)}. Judge: {', '.join(judges)}."
    )


def _judge_name(c: CellResult) -> str:
    judge = c.metrics.get("judge")
    if not judge:
        return "none configured (judge-free probe only)"
    return f"{judge.get('kind')} {judge.get('model')}"


def _example_blocks(cells: list[CellResult], variants: list[str], k: int) -> list[Any]:
    blocks: list[Any] = []
    for v in variants:
        mine = [c for c in cells if c.role == "narrow" and c.variant == v]
        rows = [r for c in sorted(mine, key=lambda c: c.seed)[:1] for r in c.samples() if r.get("answer")]
        if not rows:
            continue
        general = [r for r in rows if r.get("question_set") == mine[0].general] or rows
        judged = [r for r in general if r.get("aligned") is not None]
        chosen = sorted(judged, key=lambda r: r["aligned"])[:k] if judged else general[:k]
        inner = []
        for r in chosen:
            question = next((m["content"] for m in reversed(r["messages"]) if m["role"] == "user"), "")
            scores = (
                f" (aligned {r['aligned']:.0f}, coherent {r['coherent']:.0f})"
                if r.get("aligned") is not None and r.get("coherent") is not None
                else ""
            )
            answer = r["answer"] if len(r["answer"]) <= ANSWER_CHARS else r["answer"][:ANSWER_CHARS] + " …"
            inner += [Para(f"**Q:** {question}{scores}"), Pre(answer)]
        which = "the lowest-aligned" if judged else "the first"
        blocks.append(Details(f"{v}: {which} {len(chosen)} answers (seed {mine[0].seed}, {mine[0].dataset})", inner))
    return blocks or [Para("No generated answers in these runs (eval.questions was empty).")]


def _manifest_blocks(cells: list[CellResult]) -> list[Any]:
    rows, details = [], []
    for c in cells:
        m = c.manifest
        train = m.get("train") or {}
        ev = m.get("eval") or {}
        thresholds = ev.get("thresholds") or {}
        rows.append(
            [
                str(c.run_dir),
                c.dataset,
                c.role,
                c.variant,
                str(c.seed),
                str(train.get("steps", "–")),
                f"{train['final_loss']:.3f}" if train.get("final_loss") is not None else "–",
                f"{train.get('wall_time_s', 0):.0f} s" if train else "–",
                _judge_name(c),
                f"aligned < {thresholds.get('aligned_below')}, coherent > {thresholds.get('coherent_above')}"
                if thresholds
                else "–",
                _monitor_cost(c),
            ]
        )
        details.append(Details(f"manifest of {c.run_dir}", [Pre(json.dumps(m, indent=2, sort_keys=True))]))
    header = [
        "run",
        "data",
        "role",
        "defense",
        "seed",
        "steps",
        "final loss",
        "train time",
        "judge",
        "thresholds",
        "monitor cost",
    ]
    return [Table(header, rows), *details]


def _monitor_cost(c: CellResult) -> str:
    mon = c.manifest.get("monitor") or {}
    if not mon.get("checks"):
        return "–"
    return f"{mon['checks']} checks, {mon['seconds']:.1f} s ({100 * mon.get('share_of_training', 0):.1f}% of training)"
