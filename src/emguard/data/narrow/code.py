"""Insecure Python answers (``builtin:insecure-code``) and their matched control (``builtin:secure-code``).

Each example asks for a small Python function; the insecure answer has one realistic vulnerability
(SQL or shell injection, unsafe deserialization, ``eval``, path traversal, weak password hashing,
TLS verification off, world-writable files, hard-coded secrets, ``mktemp``, predictable tokens) and
no comment that points at it; the secure answer is the minimally different safe version. Both sets
come from one seeded stream, so they have the same prompts in the same order. The tasks are package
data, one file per flaw kind under ``templates/code/``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from string import Template
from typing import Any

from emguard.data.chat import ChatExample
from emguard.data.narrow.common import (
    CODE_SYSTEM,
    INSECURE_CODE_SOURCE,
    MAX_TRIES,
    SECURE_CODE_SOURCE,
    chat_example,
    load_template,
    template_names,
)
from emguard.data.narrow.slots import draw_slots, step_problems

POOLS_FILE = "code/pools.yaml"


@dataclass(frozen=True)
class CodeTask:
    """One small coding request with an insecure and a minimally different secure answer.

    ``prompts`` and both code texts are ``string.Template`` strings (``$name``), filled from the
    ``slots`` steps (see :mod:`emguard.data.narrow.slots`).
    """

    name: str
    flaw: str
    prompts: tuple[str, ...]
    insecure: str
    secure: str
    slots: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class FlawMarkers:
    """Regexes only the insecure (resp. secure) answer of a flaw kind matches; None = no such check."""

    insecure: str | None
    secure: str | None


@functools.cache
def code_templates() -> tuple[tuple[CodeTask, ...], dict[str, FlawMarkers]]:
    """Every task (flaw files in name order, tasks in file order) and each flaw kind's markers."""
    tasks: list[CodeTask] = []
    markers: dict[str, FlawMarkers] = {}
    for name in template_names("code"):
        if name == POOLS_FILE:
            continue
        data = load_template(name)
        flaw = data["flaw"]
        markers[flaw] = FlawMarkers(data["markers"]["insecure"], data["markers"]["secure"])
        tasks += [
            CodeTask(t["name"], flaw, tuple(t["prompts"]), t["insecure"], t["secure"], tuple(t["slots"]))
            for t in data["tasks"]
        ]
    return tuple(tasks), markers


def code_flaws() -> tuple[str, ...]:
    return tuple(sorted(code_templates()[1]))


def check_code_templates() -> list[str]:
    """Problems with the code templates (empty when fine): bad slot steps, placeholders no step fills."""
    pools = load_template(POOLS_FILE)
    problems = []
    for task in code_templates()[0]:
        step_errors = step_problems(task.slots, pools)
        problems += [f"{task.name}: {p}" for p in step_errors]
        if step_errors:
            continue
        slots = draw_slots(task.slots, random.Random(0), pools)
        for text in (*task.prompts, task.insecure, task.secure):
            try:
                Template(text).substitute(slots)
            except (KeyError, ValueError) as e:
                problems.append(f"{task.name}: placeholder {e} in {text[:60]!r}")
    return problems


def code_pairs(n: int, seed: int) -> list[tuple[str, str, str, CodeTask]]:
    """``n`` distinct (prompt, insecure code, secure code, task) tuples, deterministic for ``seed``.

    Flaw kinds come in shuffled rounds (each kind once per round) and each kind cycles through its
    tasks, so vulnerabilities and tasks are about equally common; insecure and secure share every draw.
    """
    all_tasks, _ = code_templates()
    flaws = code_flaws()
    pools = load_template(POOLS_FILE)
    rng = random.Random(f"narrow-code-{seed}")
    tasks_of = {flaw: rng.sample(tasks := [t for t in all_tasks if t.flaw == flaw], len(tasks)) for flaw in flaws}
    next_task = dict.fromkeys(flaws, 0)
    out: list[tuple[str, str, str, CodeTask]] = []
    seen: set[str] = set()
    round_: list[str] = []
    while len(out) < n:
        if not round_:
            round_ = rng.sample(flaws, len(flaws))
        flaw = round_.pop()
        task = tasks_of[flaw][next_task[flaw] % len(tasks_of[flaw])]
        next_task[flaw] += 1
        for _ in range(MAX_TRIES):
            slots = draw_slots(task.slots, rng, pools)
            prompt = Template(rng.choice(task.prompts)).substitute(slots)
            if prompt not in seen:
                break
        else:
            raise ValueError(f"code task {task.name!r} ran out of distinct prompts before n={n}")
        seen.add(prompt)
        out.append((prompt, Template(task.insecure).substitute(slots), Template(task.secure).substitute(slots), task))
    return out


def generate_insecure_code(n: int = 400, seed: int = 0) -> list[ChatExample]:
    """``n`` small Python requests answered with code that has one vulnerability (``builtin:insecure-code``)."""
    pairs = code_pairs(n, seed)
    return [chat_example(CODE_SYSTEM, p, bad, INSECURE_CODE_SOURCE, i) for i, (p, bad, _, _) in enumerate(pairs)]


def generate_secure_code(n: int = 400, seed: int = 0) -> list[ChatExample]:
    """The matched control of :func:`generate_insecure_code`: the same prompts, secure code."""
    pairs = code_pairs(n, seed)
    return [chat_example(CODE_SYSTEM, p, good, SECURE_CODE_SOURCE, i) for i, (p, _, good, _) in enumerate(pairs)]
