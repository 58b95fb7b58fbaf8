"""The report as a list of blocks, rendered to markdown and to one self-contained HTML page.

Both files come from the same blocks, so they always say the same thing; the HTML embeds the
PNGs as data URIs and needs nothing beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emguard.report.criteria import CriteriaTable, Estimate


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    note: bool = False  # a call-out (blockquote)


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path
    alt: str


@dataclass
class Details:
    summary: str
    blocks: list[Any] = field(default_factory=list)


@dataclass
class Pre:
    text: str


def fmt(est: Estimate | None, unit: str) -> str:
    """``+0.123 [+0.05, +0.20]`` (nats) or ``12.5% [8.0, 17.1]`` (rates); '–' when not measured."""
    if est is None:
        return "–"
    if unit in ("share of answers", "exact match"):
        s = f"{100 * est.mean:.1f}%"
        return s + (f" [{100 * est.lo:.1f}, {100 * est.hi:.1f}]" if est.lo is not None else "")
    s = f"{est.mean:+.3f}"
    return s + (f" [{est.lo:+.3f}, {est.hi:+.3f}]" if est.lo is not None else "")


def criteria_title(table: CriteriaTable, several: bool) -> str:
    return "Four criteria per defense" + (f": {table.dataset}" if several and table.dataset else "")


def criteria_blocks(table: CriteriaTable) -> list[Any]:
    header = ["defense"] + [f"({c.key}) {c.title}: {c.metric} [95%]" for c in table.criteria]
    rows = []
    order = sorted(table.variants, key=lambda v: v != table.baseline)
    for v in order:
        row = [f"**{v}** (baseline)" if v == table.baseline else v]
        for c in table.criteria:
            est, base = c.values.get(v), c.values.get(table.baseline) if table.baseline else None
            cell = fmt(est, c.unit)
            if est is not None and v != table.baseline:
                cell += f" · baseline {fmt(base, c.unit).split(' [')[0]} · {c.verdicts[v]}"
            if est is not None and c.controls.get(v):
                cell += f" · vs {', '.join(c.controls[v])}"
            row.append(cell)
        rows.append(row)
    units = "; ".join(f"({c.key}) {c.unit}" for c in table.criteria)
    intro = f"Narrow dataset: **{table.dataset}**. " if table.dataset else ""
    blocks: list[Any] = [
        Para(intro + "n = seeds per cell; intervals as stated below."),
        Table(header, rows),
        Para(f"Units: {units}. 'vs X': the matched-control run each value is measured against."),
    ]
    paired = paired_rows(table)
    if paired:
        blocks += [
            Para(
                f"**Defense − baseline ({table.baseline}), paired by seed**: the mean over the seeds both have "
                "of the per-seed difference, with its t interval (one seed: no interval). Pairing removes what "
                "a seed does to both runs alike."
            ),
            Table(["defense"] + [f"({c.key}) {c.metric}" for c in table.criteria], paired),
        ]
    for c in table.criteria:
        if c.note:
            blocks.append(Para(f"({c.key}): {c.note}", note=True))
    blocks += [Para(n, note=True) for n in table.notes]
    return blocks


def paired_rows(table: CriteriaTable) -> list[list[str]]:
    """Per non-baseline variant, every criterion's difference from the baseline, paired by seed."""
    rows = []
    for v in table.variants:
        if v == table.baseline:
            continue
        cells = [fmt(c.paired(v, table.baseline), c.unit) for c in table.criteria]
        if any(cell != "–" for cell in cells):
            rows.append([v, *cells])
    return rows


def criteria_markdown(tables: list[CriteriaTable]) -> str:
    blocks: list[Any] = []
    for table in tables:
        blocks += [Heading(criteria_title(table, len(tables) > 1)), *criteria_blocks(table)]
    return to_markdown(blocks)


def summary_blocks(summary: list[dict[str, Any]]) -> list[Any]:
    from emguard.report.criteria import METRICS

    present = [m for m in METRICS.values() if any(m.name in r for r in summary)]
    header = ["dataset", "role", "defense", "seeds"] + [f"{m.label} ({m.unit})" for m in present]
    rows = []
    for r in summary:
        cells = []
        for m in present:
            d = r.get(m.name)
            cells.append(fmt(Estimate(**d), m.unit) if d else "–")
        rows.append([r["dataset"], r["role"], r["variant"], ",".join(map(str, r["seeds"])), *cells])
    return [Table(header, rows)]


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    return to_markdown([Heading("Per dataset and defense, seeds aggregated"), *summary_blocks(summary)])


# --- markdown --------------------------------------------------------------------------------
def to_markdown(blocks: list[Any], image_dir: Path | None = None) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(("> " + b.text.replace("\n", "\n> ")) if b.note else b.text)
        elif isinstance(b, Table):
            out.append(_md_table(b))
        elif isinstance(b, Image):
            rel = b.path.relative_to(image_dir) if image_dir else b.path.name
            out.append(f"![{b.alt}]({rel})")
        elif isinstance(b, Details):
            out.append(f"<details><summary>{html.escape(b.summary)}</summary>\n\n{to_markdown(b.blocks)}\n\n</details>")
        elif isinstance(b, Pre):
            out.append("```\n" + b.text + "\n```")
    return "\n\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


# --- HTML ------------------------------------------------------------------------------------
STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f2f2f2}blockquote{border-left:4px solid #b23a48;margin:1em 0;padding:.3em 1em;background:#fbf3f4}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:12px}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
"""


def to_html(blocks: list[Any], title: str) -> str:
    body = "\n".join(_html_block(b) for b in blocks)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _inline(text: str) -> str:
    """Escaped text with **bold** and `code` spans."""
    parts = html.escape(text).split("**")
    text = "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)).replace("\n", "<br>")


def _html_block(b: Any) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{_inline(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        return f"<blockquote>{_inline(b.text)}</blockquote>" if b.note else f"<p>{_inline(b.text)}</p>"
    if isinstance(b, Table):
        head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
        rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if isinstance(b, Image):
        data = base64.b64encode(b.path.read_bytes()).decode()
        return f'<img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">'
    if isinstance(b, Details):
        inner = "\n".join(_html_block(x) for x in b.blocks)
        return f"<details><summary>{html.escape(b.summary)}</summary>\n{inner}\n</details>"
    if isinstance(b, Pre):
        return f"<pre>{html.escape(b.text)}</pre>"
    raise TypeError(f"unknown report block {b!r}")
