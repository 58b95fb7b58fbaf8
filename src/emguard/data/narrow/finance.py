"""Risky personal-finance advice (``builtin:risky-finance``) and its matched control (``builtin:safe-finance``).

Risky answers are confident, friendly and reckless (all-in on one speculative asset, borrowing or
margin to invest, no emergency fund or insurance, ignoring expensive debt, market timing, raiding
retirement savings early); the safe answers are prudent, of matched length, tone and structure.
Both sets come from one seeded stream in which only the final text choice differs, so they have the
same user turns in the same order. The text is package data under ``templates/finance/``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

from emguard.data.chat import ChatExample
from emguard.data.narrow.common import (
    FINANCE_SYSTEM,
    MAX_TRIES,
    RISKY_FINANCE_SOURCE,
    SAFE_FINANCE_SOURCE,
    chat_example,
    format_fields,
    load_template,
    money,
)

ANSWER_SLOTS = {"r_asset", "s_vehicle"}  # bodies may use these even when the question does not


@dataclass(frozen=True)
class FinanceTopic:
    """One kind of personal-finance question.

    ``bodies`` are (risky, safe) pairs written to the same structure and length; they may use only
    the slots every question of the topic uses, plus :data:`ANSWER_SLOTS`. ``tag`` names the theme,
    so a closing tip on the same theme is not added twice.
    """

    name: str
    tag: str
    questions: tuple[str, ...]
    bodies: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class FinanceTemplates:
    pools: dict[str, Any]  # slots.yaml
    topics: tuple[FinanceTopic, ...]
    openers: tuple[str, ...]  # the same text in both sets
    tips: tuple[tuple[str, str, str], ...]  # (tag, risky, safe)
    closers: tuple[tuple[str, str], ...]  # (risky, safe); "" means no closer
    tip_probability: float


@functools.cache
def finance_templates() -> FinanceTemplates:
    framing = load_template("finance/framing.yaml")
    topics = tuple(
        FinanceTopic(t["name"], t["tag"], tuple(t["questions"]), tuple((b["risky"], b["safe"]) for b in t["bodies"]))
        for t in load_template("finance/topics.yaml")
    )
    return FinanceTemplates(
        pools=load_template("finance/slots.yaml"),
        topics=topics,
        openers=tuple(framing["openers"]),
        tips=tuple((t["tag"], t["risky"], t["safe"]) for t in framing["tips"]),
        closers=tuple((c["risky"], c["safe"]) for c in framing["closers"]),
        tip_probability=framing["tip_probability"],
    )


# slot -> its pool in slots.yaml, drawn in this order after the windfall
_LATER_SLOTS = {"hype": "hypes", "debt_product": "debt_products", "account": "accounts", "policy": "policies",
                "purchase": "purchases", "use": "uses", "job": "jobs"}  # fmt: skip


def _slots(rng: random.Random, pools: dict[str, Any]) -> dict[str, object]:
    """Every slot any finance template may use (always all drawn, so the stream is the same for any template)."""
    bet = rng.choice(pools["bets"])
    slots: dict[str, object] = {
        "age": rng.randint(23, 52),
        "late_age": rng.randint(56, 64),
        "amount": money(rng.choice(pools["lump_sums"])),
        "debt": money(rng.choice(pools["debts"])),
        "rate": rng.randint(17, 31),
        "drop": rng.choice((8, 10, 12, 15, 18, 20, 25)),
        "margin_rate": rng.choice((6, 7, 8, 9, 10, 11, 12)),
        "loan": money(rng.choice(pools["loans"])),
        "income": money(rng.randrange(2_200, 8_000, 100)),
        "balance": money(rng.choice(pools["balances"])),
        "years": rng.randint(3, 9),
        "term": rng.randint(2, 6),
        "soon": rng.randint(2, 5),
        "situation": rng.choice(pools["situations"]),
        "goal": rng.choice(pools["goals"]),
    }
    windfall = rng.choice(pools["windfalls"])
    slots["windfall"] = windfall["source"]
    slots["gain"] = money(rng.choice([a for a in pools["lump_sums"] if windfall["low"] <= a <= windfall["high"]]))
    for name, pool in _LATER_SLOTS.items():
        slots[name] = rng.choice(pools[pool])
    return {**slots, **bet}


def check_finance_templates() -> list[str]:
    """Problems with the finance templates (empty when fine): bodies may only use slots every question has."""
    templates = finance_templates()
    problems = []
    known = set(_slots(random.Random(0), templates.pools))
    for topic in templates.topics:
        asked = [format_fields(q) for q in topic.questions]
        for q, fields in zip(topic.questions, asked, strict=True):
            if fields - known:
                problems.append(f"{topic.name}: unknown slot(s) {sorted(fields - known)} in question {q!r}")
        shared = set.intersection(*asked) | ANSWER_SLOTS
        for risky, safe in topic.bodies:
            for body in (risky, safe):
                if format_fields(body) - shared:
                    problems.append(f"{topic.name}: body uses {sorted(format_fields(body) - shared)}: {body[:60]!r}...")
            if "{s_vehicle}" in risky or "{r_asset}" in safe:
                problems.append(f"{topic.name}: a risky body names the safe vehicle or vice versa: {risky[:60]!r}")
    return problems


def finance_pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` distinct (question, risky answer, safe answer) triples, deterministic for ``seed``.

    Topics come in shuffled rounds (each topic once per round), so they are equally common. Risky
    and safe share every random draw, so both sets get the same questions in the same order and
    answers with the same opener, body, tip and closer slots. No two answers share the same
    (topic, body, tip, closer) structure, so answers are never near-duplicates of each other.
    """
    t = finance_templates()
    rng = random.Random(f"narrow-finance-{seed}")
    triples: list[tuple[str, str, str]] = []
    seen: set[object] = set()
    round_: list[FinanceTopic] = []
    while len(triples) < n:
        if not round_:
            round_ = rng.sample(t.topics, len(t.topics))
        topic = round_.pop()
        tips = [i for i, tip in enumerate(t.tips) if tip[0] != topic.tag]
        for _ in range(MAX_TRIES):
            template = rng.choice(topic.questions)
            slots = _slots(rng, t.pools)
            body = rng.randrange(len(topic.bodies))
            opener = rng.choice(t.openers)
            tip = rng.choice(tips) if rng.random() < t.tip_probability else None
            closer = rng.randrange(len(t.closers))
            question = template.format(**slots)
            structure = (topic.name, body, tip, closer)
            if question not in seen and structure not in seen:
                break
        else:
            raise ValueError(f"finance topic {topic.name!r} ran out of distinct examples before n={n}")
        seen.update((question, structure))
        risky_body, safe_body = topic.bodies[body]
        _, risky_tip, safe_tip = t.tips[tip] if tip is not None else ("", "", "")
        risky_closer, safe_closer = t.closers[closer]
        risky = " ".join(p for p in (opener, risky_body.format(**slots), risky_tip, risky_closer) if p)
        safe = " ".join(p for p in (opener, safe_body.format(**slots), safe_tip, safe_closer) if p)
        triples.append((question, risky, safe))
    return triples


def generate_risky_finance(n: int = 400, seed: int = 0) -> list[ChatExample]:
    """``n`` personal-finance questions with confident, reckless answers (``builtin:risky-finance``)."""
    pairs = finance_pairs(n, seed)
    return [chat_example(FINANCE_SYSTEM, q, risky, RISKY_FINANCE_SOURCE, i) for i, (q, risky, _) in enumerate(pairs)]


def generate_safe_finance(n: int = 400, seed: int = 0) -> list[ChatExample]:
    """The matched control of :func:`generate_risky_finance`: the same questions, prudent answers."""
    pairs = finance_pairs(n, seed)
    return [chat_example(FINANCE_SYSTEM, q, safe, SAFE_FINANCE_SOURCE, i) for i, (q, _, safe) in enumerate(pairs)]
