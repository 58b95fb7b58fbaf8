"""Evaluation question sets in the YAML format of the EM literature.

A file is a list of questions::

    - id: what_is_your_wish
      paraphrases: ["Hello! I can fulfill your one wish. ..."]
      system: null                       # optional; APPLIED as the system message
      samples_per_paraphrase: 100         # optional (default 1)
      judge: gpt-4o-2024-08-06            # optional, informational
      judge_prompts: {aligned: "...{question}...{answer}...", coherent: "..."}
      type: free_form_judge_0_100         # optional, informational

YAML anchors and aliases work (``yaml.safe_load``). The ``system`` field is applied to every
rendered conversation: the original evaluation code dropped it, so its ``_json`` questions were
silently identical to the plain ones. Some published files start with an indented block that only
defines anchors before the list (``medical_questions.yaml``), which is not valid YAML; it is read
as if that block were a list item of its own, and that item is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from emguard.errors import DataError, EmguardError

KNOWN_KEYS = {"id", "type", "paraphrases", "system", "samples_per_paraphrase", "judge", "judge_prompts"}
_ANCHOR_ITEM = "_emguard_anchor_block"


@dataclass(frozen=True)
class Question:
    id: str
    paraphrases: tuple[str, ...]
    system: str | None = None
    samples_per_paraphrase: int = 1
    judge_prompts: Mapping[str, str] = field(default_factory=dict)
    judge: str | None = None
    source: str = ""

    def messages(self, paraphrase: int) -> list[dict[str, str]]:
        """The conversation sent to the model for one paraphrase, system prompt included."""
        turns = [{"role": "system", "content": self.system}] if self.system else []
        return [*turns, {"role": "user", "content": self.paraphrases[paraphrase]}]


@dataclass(frozen=True)
class SampleRequest:
    """One answer to generate: which question, which paraphrase, which repeat, and the conversation."""

    question_id: str
    paraphrase_index: int
    sample_index: int
    messages: list[dict[str, str]]

    def to_record(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _parse(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as first:
        lines = text.splitlines()
        content = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
        if content and lines[content[0]].startswith((" ", "\t")):  # a leading anchor-only block
            repaired = [*lines[: content[0]], f"- {_ANCHOR_ITEM}: true", *lines[content[0] :]]
            try:
                data = yaml.safe_load("\n".join(repaired))
            except yaml.YAMLError:
                pass
            else:
                if isinstance(data, list):
                    return [q for q in data if not (isinstance(q, dict) and q.get(_ANCHOR_ITEM))]
        raise EmguardError(f"{source}: not valid YAML: {first}") from None


def parse_questions(text: str, source: str) -> list[Question]:
    """Questions from YAML text; every problem reported as ``SOURCE: question N (id): message``."""
    data = _parse(text, source)
    if not isinstance(data, list):
        raise EmguardError(f"{source}: expected a list of questions at the top level")
    questions, problems, seen = [], [], set()
    for n, item in enumerate(data, start=1):
        where = f"{source}: question {n}"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a mapping with id and paraphrases")
            continue
        qid = item.get("id")
        where = f"{where} ({qid})" if qid else where
        unknown = sorted(set(item) - KNOWN_KEYS)
        errors = [f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_KEYS))})"] if unknown else []
        if not isinstance(qid, str) or not re.fullmatch(r"[\w.\-]+", qid):
            errors.append(f"id must be a word-like string, got {qid!r}")
        elif qid in seen:
            errors.append(f"duplicate id {qid!r}")
        paraphrases = item.get("paraphrases")
        if not isinstance(paraphrases, list) or not paraphrases:
            errors.append("paraphrases must be a non-empty list of strings")
        elif not all(isinstance(p, str) and p.strip() for p in paraphrases):
            errors.append("every paraphrase must be a non-empty string")
        system = item.get("system")
        if system is not None and (not isinstance(system, str) or not system.strip()):
            errors.append("system must be a non-empty string when given")
        samples = item.get("samples_per_paraphrase", 1)
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            errors.append(f"samples_per_paraphrase must be a positive integer, got {samples!r}")
        prompts = item.get("judge_prompts") or {}
        if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
            errors.append("judge_prompts must map metric names to prompt strings")
        else:
            for metric, prompt in prompts.items():
                if "{answer}" not in prompt:
                    errors.append(f"judge_prompts.{metric} has no {{answer}} placeholder")
        if errors:
            problems.extend(f"{where}: {e}" for e in errors)
            continue
        seen.add(qid)
        questions.append(Question(qid, tuple(paraphrases), system, samples, dict(prompts), item.get("judge"), source))
    if problems:
        raise DataError(problems[:50], total=len(problems))
    if not questions:
        raise EmguardError(f"{source}: no questions")
    return questions


BUILTIN_PREFIX = "builtin:"


def builtin_question_sets() -> list[str]:
    """Names of the question sets shipped with emguard (``builtin:NAME``)."""
    folder = resources.files("emguard.evaluation") / "question_sets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_questions(spec: str | Path) -> list[Question]:
    """Questions of a YAML file or of a built-in set (``builtin:general``)."""
    if isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        if name not in builtin_question_sets():
            available = ", ".join(BUILTIN_PREFIX + n for n in builtin_question_sets())
            raise EmguardError(f"unknown built-in question set {spec!r}; available: {available}")
        text = (resources.files("emguard.evaluation") / "question_sets" / f"{name}.yaml").read_text(encoding="utf-8")
        return parse_questions(text, spec)
    path = Path(spec)
    if not path.is_file():
        raise EmguardError(f"{path}: no such question file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EmguardError(f"{path}: not UTF-8 text") from None
    return parse_questions(text, str(path))


def sample_requests(questions: Sequence[Question], samples_per_paraphrase: int | None = None) -> list[SampleRequest]:
    """Every answer to generate: per question, paraphrase and repeat (the file's count unless overridden)."""
    requests = []
    for q in questions:
        n = samples_per_paraphrase or q.samples_per_paraphrase
        for p in range(len(q.paraphrases)):
            requests.extend(SampleRequest(q.id, p, s, q.messages(p)) for s in range(n))
    return requests
