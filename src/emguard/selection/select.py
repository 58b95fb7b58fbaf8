"""``emguard select``: Interleaving++ selection of safe data into a run directory.

Writes ``selected.jsonl`` (chat JSONL, best score first: usable as ``interleave.source`` or as
training data), ``selection_scores.jsonl`` (every pool example: score, both losses, refusal flag,
rank) and ``selection.json`` (the settings, adapters with their hashes, counts and timings).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emguard.config import RunConfig, SelectConfig
from emguard.data.chat import ChatExample
from emguard.data.sources import load_examples
from emguard.errors import ConfigError
from emguard.evaluation.generation import find_adapter
from emguard.fsio import atomic_write_json, atomic_write_jsonl
from emguard.likelihood import adapter_fingerprint
from emguard.models import cache_root, load_model, load_tokenizer, model_identity, resolve_model
from emguard.selection.perplexity_gap import PoolScores, score_pool
from emguard.selection.stratify import composition, strata, stratified_order

log = logging.getLogger(__name__)
DEFAULT_FRACTION = 0.25
SELECTED, SCORES, SUMMARY = "selected.jsonl", "selection_scores.jsonl", "selection.json"


@dataclass
class SelectResult:
    run_dir: Path
    selected: int
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "selected": self.selected, **self.summary}


def misaligned_adapters(paths: list[str], model_spec: str, what: str) -> list[Path]:
    """Adapter dirs of the misaligned models (run dirs allowed); warns when one was trained on another base."""
    if not paths:
        raise ConfigError(
            f"{what}.misaligned is empty: Interleaving++ needs at least one misaligned LoRA adapter of the same base "
            "model (e.g. a run of `emguard train` on builtin:risky-finance with no defense)"
        )
    adapters = [find_adapter(p) for p in paths]
    for adapter in adapters:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base and base != model_spec:
            log.warning(
                "%s was trained on %r, not on %r; the scores assume the same base model", adapter, base, model_spec
            )
    return adapters


def select_count(section: SelectConfig, available: int) -> int:
    """How many examples to keep out of ``available`` non-refusals."""
    if section.count is not None:
        if section.count > available:
            raise ConfigError(
                f"select.count is {section.count} but the pool has only {available} candidates after refusal "
                "filtering; lower count or use a larger pool"
            )
        return section.count
    return max(1, round((section.fraction or DEFAULT_FRACTION) * available))


def score_rows(pool: list[ChatExample], scores: PoolScores, ranking: list[int], n: int) -> list[dict[str, Any]]:
    rank = {i: r + 1 for r, i in enumerate(ranking)}

    def num(x: float) -> float | None:
        return None if np.isnan(x) else round(float(x), 6)

    return [
        {
            "index": i,
            "rank": rank.get(i),
            "selected": rank.get(i, n + 1) <= n,
            "score": num(scores.score[i]),
            "loss_aligned": num(scores.loss_aligned[i]),
            "loss_misaligned": [num(x) for x in scores.loss_misaligned[:, i]],
            "refusal": bool(scores.refusal[i]),
            "user": next((m["content"] for m in ex.messages if m["role"] == "user"), "")[:200],
        }
        for i, ex in enumerate(pool)
    ]


def run_select(config: RunConfig, progress: bool = True) -> SelectResult:
    """Score ``config.select.pool`` and write the top examples (see the module docstring)."""
    section = config.select
    if section is None:
        raise ConfigError("the config has no select section (pool, misaligned adapters, count or fraction)")
    adapters = misaligned_adapters(section.misaligned, config.model, "select")
    pool = load_examples(section.pool, seed=config.training.seed)
    resolved = resolve_model(config.model)
    tokenizer = load_tokenizer(resolved, config.model_options)
    model = load_model(resolved, config.model_options)
    scores = score_pool(
        model,
        tokenizer,
        pool,
        adapters,
        base_identity=model_identity(resolved, config.model_options),
        options=section,
        cache_dir=cache_root() / "nll",
        progress=progress,
    )
    labels, rule = strata(pool, section.stratify, section.length_bins)
    ranking = stratified_order(scores.ranking(), labels)
    n = select_count(section, len(ranking))
    chosen = ranking[:n]
    summary = {
        "model": config.model,
        "pool": section.pool,
        "pool_size": len(pool),
        "refusals_dropped": int(scores.refusal.sum()),
        "selected": n,
        "adapters": [{"path": str(a), "sha256": adapter_fingerprint(a)} for a in adapters],
        "score": {"formula": "(mean_k L_misaligned_k - L_aligned) / (L_aligned + epsilon)", "epsilon": section.epsilon},
        "selected_score_range": [float(min(scores.score[chosen])), float(max(scores.score[chosen]))]
        if chosen
        else None,
        "stratify": rule,
        "selected_by_stratum": composition(chosen, labels),
        "candidates_by_stratum": composition(scores.ranking(), labels),
        "settings": section.model_dump(mode="json"),
        "scoring": scores.stats,
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / SCORES, score_rows(pool, scores, ranking, n))
    atomic_write_jsonl(out / SELECTED, [{"messages": [dict(m) for m in pool[i].messages]} for i in chosen])
    atomic_write_json(out / SUMMARY, summary)
    return SelectResult(out, n, summary)
