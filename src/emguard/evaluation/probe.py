"""Judge-free probe: how much more likely the evaluated model finds misaligned answers than the base model does.

For each pair (one question, an aligned and a misaligned answer of matched length, format and
register), ``gap = lp(misaligned) − lp(aligned)``, where ``lp`` is the mean log-probability per
answer token (the assistant tokens of the chat template, end-of-turn included). The probe
reports ``shift = gap(evaluated) − gap(base)`` averaged over pairs, with a 95% bootstrap interval
over pairs, and, when a control model is given (a fine-tune on matched benign data),
``shift − shift(control)``: a naive gap mostly measures "fine-tuning happened" (a benign
control moved it almost as much as an EM-inducing fine-tune here), so only the shift against a
control says something about misalignment. It is a **proxy**, cheap and deterministic, never the
EM rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from emguard.errors import DataError, EmguardError
from emguard.jsonl import jsonl_objects
from emguard.likelihood import NLLCache, cached_answer_nll, encode_conversations

BUILTIN_PREFIX = "builtin:"
PAIR_KEYS = ("id", "question", "aligned", "misaligned")


@dataclass(frozen=True)
class AnswerPair:
    id: str
    question: str
    aligned: str
    misaligned: str
    system: str | None = None

    def messages(self, answer: str) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": self.system}] if self.system else []
        return [*turns, {"role": "user", "content": self.question}, {"role": "assistant", "content": answer}]


def load_pairs(spec: str | Path) -> list[AnswerPair]:
    """Pairs from a JSONL file (``id``, ``question``, ``aligned``, ``misaligned``, optional ``system``)
    or a built-in set (``builtin:general``)."""
    if isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        folder = resources.files("emguard.evaluation") / "probe_pairs"
        resource = folder / f"{name}.jsonl"
        if not resource.is_file():
            names = sorted(p.name.removesuffix(".jsonl") for p in folder.iterdir() if p.name.endswith(".jsonl"))
            available = ", ".join(BUILTIN_PREFIX + n for n in names)
            raise EmguardError(f"unknown built-in probe pairs {spec!r}; available: {available}")
        return _parse_pairs(resource.read_text(encoding="utf-8"), spec)
    path = Path(spec)
    if not path.is_file():
        raise EmguardError(f"{path}: no such probe-pairs file")
    return _parse_pairs(path.read_text(encoding="utf-8"), str(path))


def spread_subset(pairs: Sequence[AnswerPair], n: int | None) -> list[AnswerPair]:
    """At most ``n`` pairs, evenly spaced through the set (a pair file is ordered by source and
    question, so the first ``n`` would all come from one of them); all of them when ``n`` is None."""
    if n is None or n >= len(pairs):
        return list(pairs)
    return [pairs[i * len(pairs) // n] for i in range(n)]


def _parse_pairs(text: str, source: str) -> list[AnswerPair]:
    rows, problems = jsonl_objects(text, source)
    pairs = []
    for number, record in rows:
        missing = [k for k in PAIR_KEYS if not isinstance(record.get(k), str) or not record[k].strip()]
        if missing:
            problems.append(f"{source}:{number}: missing or empty {', '.join(missing)}")
            continue
        pairs.append(AnswerPair(*(record[k] for k in PAIR_KEYS), system=record.get("system")))
    if problems:
        problems.sort(key=lambda p: int(p[len(source) + 1 :].split(":", 1)[0]))  # file order
        raise DataError(problems[:50], total=len(problems))
    if not pairs:
        raise EmguardError(f"{source}: no probe pairs")
    return pairs


def answer_logprobs(
    model: Any, tokenizer: Any, conversations: Sequence[list[dict]], batch_size: int = 8, cache: NLLCache | None = None
) -> list[float]:
    """Mean log-probability per assistant token of each conversation (``−L`` of ``emguard.likelihood``).

    ``batch_size`` conversations of the longest length bound each forward pass's padded size.
    ``cache`` holds losses of this exact model state: cached conversations are not recomputed, new
    ones are added.
    """
    if not conversations:
        return []
    encoded, keys = encode_conversations(tokenizer, conversations)
    budget = batch_size * max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, _ = cached_answer_nll(model, encoded, keys, cache, pad_id=pad, batch_tokens=budget)
    return (-nll).tolist()


def pair_logprobs(
    model: Any, tokenizer: Any, pairs: Sequence[AnswerPair], batch_size: int = 8, cache: NLLCache | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(lp(misaligned), lp(aligned))`` per pair under ``model`` (nats per token)."""
    conversations = [p.messages(p.misaligned) for p in pairs] + [p.messages(p.aligned) for p in pairs]
    lp = np.array(answer_logprobs(model, tokenizer, conversations, batch_size, cache))
    return lp[: len(pairs)], lp[len(pairs) :]


def pair_gaps(
    model: Any, tokenizer: Any, pairs: Sequence[AnswerPair], batch_size: int = 8, cache: NLLCache | None = None
) -> np.ndarray:
    """``lp(misaligned) − lp(aligned)`` per pair under ``model`` (nats per token)."""
    misaligned, aligned = pair_logprobs(model, tokenizer, pairs, batch_size, cache)
    return misaligned - aligned


def summarize_shift(shifts: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean over pairs with a 95% percentile bootstrap interval over pairs."""
    rng = np.random.default_rng(seed)
    means = rng.choice(shifts, size=(n_boot, len(shifts)), replace=True).mean(1)
    return {
        "mean": float(shifts.mean()),
        "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
        "pairs": int(len(shifts)),
    }


def probe_report(
    evaluated: np.ndarray,
    base: np.ndarray,
    control: np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    aligned: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The probe's result: gaps and their shift from the base model (and from a control model).

    ``aligned`` = (lp of the aligned answers under the evaluated model, under the base model) adds
    ``aligned_nll_shift``: how many nats per token the evaluated model lost on coherent, aligned
    reference answers, a judge-free proxy for lost coherence (positive = worse).
    """
    report = {
        "kind": "judge-free log-likelihood probe (a proxy, not the EM rate)",
        "unit": "nats per answer token; positive = misaligned answers became relatively more likely",
        "gap_evaluated": summarize_shift(evaluated, n_boot, seed),
        "gap_base": summarize_shift(base, n_boot, seed),
        "shift_vs_base": summarize_shift(evaluated - base, n_boot, seed),
    }
    if control is not None:
        report["shift_vs_control"] = summarize_shift(evaluated - control, n_boot, seed)
    if aligned is not None:
        report["aligned_nll_shift"] = summarize_shift(aligned[1] - aligned[0], n_boot, seed)
    return report
