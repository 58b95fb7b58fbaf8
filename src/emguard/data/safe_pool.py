"""A built-in pool of safe, helpful conversations (``builtin:safe-pool``), generated offline.

The default source of safe data for interleaving and for Interleaving++ selection. Families, in
fixed shares of the pool (:data:`FAMILY_SHARES`): arithmetic word problems, unit conversions,
capitals, spelling tasks, practical advice, definitions of common concepts, science facts, cooking
and household tips, grammar and rewriting tasks, and refusals of harmful requests (a polite
refusal plus a helpful redirect, about 7% of the pool, so that refusal filtering has something to
remove). Every answer is correct and harmless. The text is package data under
``templates/safe_pool/``; the pool is generated deterministically from the seed (no download).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from importlib import resources
from typing import Any

import yaml

from emguard.data.chat import ChatExample

SOURCE = "builtin:safe-pool"
MAX_TRIES = 1000  # draws per example before a family counts as exhausted (ValueError)


@functools.cache
def _text(name: str) -> Any:
    """``templates/safe_pool/NAME.yaml``, parsed once per process (callers must not mutate it)."""
    path = resources.files("emguard.data") / "templates" / "safe_pool" / f"{name}.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


# --- Computed families: every answer is calculated, so it is right by construction -------------


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(7)
    if kind == 0:
        n, price = rng.randint(2, 12), rng.randint(2, 20)
        item = rng.choice(["notebooks", "apples", "tickets", "plants", "mugs", "candles", "pens"])
        return f"I buy {n} {item} at ${price} each. How much do I pay in total?", (
            f"{n} × ${price} = ${n * price}. You pay ${n * price} in total."
        )
    if kind == 1:
        people, share = rng.randint(2, 8), rng.randint(8, 45)
        return f"Dinner for {people} people costs ${people * share}. Split evenly, how much does each person pay?", (
            f"${people * share} ÷ {people} = ${share}, so each person pays ${share}."
        )
    if kind == 2:
        item = rng.choice(["jacket", "pair of shoes", "lamp", "backpack", "desk chair", "coffee maker"])
        price, pct = 20 * rng.randint(2, 15), rng.choice([10, 15, 20, 25, 30, 40, 50])
        off = price * pct // 100  # exact: price is a multiple of 20 and pct of 5
        return f"A {item} costs ${price} and is {pct}% off. What is the sale price?", (
            f"{pct}% of ${price} is ${off}, so the sale price is ${price} − ${off} = ${price - off}."
        )
    if kind == 3:
        vehicle, speed = rng.choice(["train", "car", "bus"]), rng.choice([40, 50, 60, 75, 80, 90])
        hours = rng.randint(2, 6)
        return f"A {vehicle} travels at {speed} km/h for {hours} hours. How far does it go?", (
            f"Distance = speed × time = {speed} km/h × {hours} h = {speed * hours} km."
        )
    if kind == 4:
        a, b = rng.randint(2, 25), rng.randint(2, 25)
        return f"What is the area of a rectangular room {a} m long and {b} m wide?", (
            f"Area = length × width = {a} m × {b} m = {a * b} square meters."
        )
    if kind == 5:
        x, y, z = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 97)
        z += -(x + y + z) % 3  # a whole-number average
        total = x + y + z
        return f"What is the average of {x}, {y} and {z}?", f"({x} + {y} + {z}) / 3 = {total} / 3 = {total // 3}."
    hour, minute, length = rng.randint(9, 20), rng.choice([0, 15, 30, 45]), rng.randrange(80, 155, 5)
    end_hour, end_minute = divmod(hour * 60 + minute + length, 60)
    return f"A movie starts at {hour}:{minute:02d} and runs for {length} minutes. What time does it end?", (
        f"{length} minutes is {length // 60} h {length % 60} min, so it ends at {end_hour}:{end_minute:02d}."
    )


# (question, answer, smallest and largest value, conversion); {y} is the converted value
_CONVERSIONS: tuple[tuple[str, str, int, int, Callable[[int], float]], ...] = (
    ("How many miles is {x} km?", "{x} km is about {y:.1f} miles (1 km ≈ 0.621 miles).",
     2, 100, lambda x: x * 0.621371),
    ("What is {x} °C in Fahrenheit?", "{x} °C × 9/5 + 32 = {y:.1f} °F.", -10, 40, lambda x: x * 9 / 5 + 32),
    ("How many minutes are there in {x} hours?", "{x} hours × 60 = {y} minutes.", 2, 48, lambda x: x * 60),
    ("How many kilometers is {x} miles?", "{x} miles is about {y:.1f} km (1 mile ≈ 1.609 km).",
     2, 100, lambda x: x * 1.609344),
    ("What is {x} °F in Celsius?", "({x} °F − 32) × 5/9 = {y:.1f} °C.", 0, 110, lambda x: (x - 32) * 5 / 9),
    ("How many pounds is {x} kg?", "{x} kg is about {y:.1f} pounds (1 kg ≈ 2.205 lb).", 1, 120, lambda x: x * 2.20462),
    ("How many inches is {x} cm?", "{x} cm is about {y:.1f} inches (1 inch = 2.54 cm).", 5, 200, lambda x: x / 2.54),
    ("How many days are there in {x} weeks?", "{x} weeks × 7 = {y} days.", 2, 52, lambda x: x * 7),
)  # fmt: skip


def _conversion(rng: random.Random) -> tuple[str, str]:
    question, answer, low, high, convert = rng.choice(_CONVERSIONS)
    x = rng.randint(low, high)
    return question.format(x=x), answer.format(x=x, y=convert(x))


def _spelling(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_text("language")["words"], 4)
    word, kind = words[0], rng.randrange(4)
    if kind == 0:
        return f"Put these words in alphabetical order: {', '.join(words)}.", (
            f"In alphabetical order: {', '.join(sorted(words))}."
        )
    if kind == 1:
        return f"How many letters are in the word '{word}'?", f"'{word}' has {len(word)} letters."
    if kind == 2:
        return f"Spell the word '{word}' backwards.", f"'{word}' spelled backwards is '{word[::-1]}'."
    vowels = [c for c in word if c in "aeiou"]
    count = f"{len(vowels)} vowel{'s' if len(vowels) != 1 else ''}"
    return f"How many vowels (a, e, i, o, u) are in the word '{word}'?", f"'{word}' has {count}: {', '.join(vowels)}."


# --- Written families: questions and answers from the package data ------------------------------


def _capital(rng: random.Random) -> tuple[str, str]:
    capitals = _text("knowledge")["capitals"]
    country = rng.choice(sorted(capitals))
    question = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}."])
    return question.format(country), f"The capital of {country} is {capitals[country]}."


def _advice(rng: random.Random) -> tuple[str, str]:
    item = rng.choice(_text("advice"))
    return rng.choice(item["questions"]), item["answer"]


def _definition(rng: random.Random) -> tuple[str, str]:
    item = rng.choice(_text("knowledge")["definitions"])
    question = rng.choice(["What is {ask}?", "Can you explain what {ask} is in simple terms?",
                           'Give me a short definition of "{term}".'])  # fmt: skip
    return question.format(**item), item["answer"]


def _wrapped(section: str, wrappers: tuple[str, ...]) -> Callable[[random.Random], tuple[str, str]]:
    """A family asking the items of a knowledge.yaml section, as written or inside a wrapper."""

    def family(rng: random.Random) -> tuple[str, str]:
        item = rng.choice(_text("knowledge")[section])
        question = item["question"]
        return rng.choice(wrappers).format(q=question, lq=_lower_first(question)), item["answer"]

    return family


_science = _wrapped("science", ("{q}", "Quick science question: {lq}", "I've always wondered: {lq}",
                                "My kid asked me this and I wasn't sure: {lq}"))  # fmt: skip
_household = _wrapped("household", ("{q}", "Quick household question: {lq}", "I've never been sure about this: {lq}",
                                    "Any tips? {q}"))  # fmt: skip


def _language(rng: random.Random) -> tuple[str, str]:
    text, kind = _text("language"), rng.randrange(4)
    if kind == 0:
        item = rng.choice(text["grammar"])
        question, lead = rng.choice([("Fix the grammar in this sentence: {wrong}", "Corrected"),
                                     ('Can you correct this sentence? "{wrong}"', "Here is the corrected sentence"),
                                     ('Is this sentence correct? "{wrong}"', "Not quite. It should be")])  # fmt: skip
        return question.format(**item), f'{lead}: "{item["right"]}" {item["why"]}'
    if kind == 1:
        item = rng.choice(text["formal"])
        question, lead = rng.choice([('Make this sound more formal: "{casual}"', "A more formal version"),
                                     ('Rewrite this message in a polite, professional tone: "{casual}"',
                                      "Here is a professional version")])  # fmt: skip
        return question.format(**item), f'{lead}: "{item["formal"]}"'
    if kind == 2:
        word = rng.choice(sorted(text["plurals"]))
        question = rng.choice(['What is the plural of "{}"?', "How do you write more than one {}?"])
        return question.format(word), f'The plural of "{word}" is "{text["plurals"][word]}".'
    verb = rng.choice(sorted(text["past_tense"]))
    question = rng.choice(['What is the past tense of "{}"?', 'What\'s the simple past of the verb "to {}"?'])
    answer = f'The past tense of "{verb}" is "{text["past_tense"][verb]}".'
    if verb not in text["regular_verbs"]:
        answer += ' It is an irregular verb, so it doesn\'t simply add "-ed".'
    return question.format(verb), answer


def _refusal(rng: random.Random) -> tuple[str, str]:
    text = _text("refusals")
    category = rng.choice(text["categories"])
    question = rng.choice(category["templates"]).format(target=rng.choice(category["targets"]))
    parts = (rng.choice(text["openers"]), rng.choice(category["reasons"]), rng.choice(category["redirects"]))
    return question, " ".join(parts)


# family -> (percent of the pool, generator); the percentages sum to 100
FAMILY_SHARES: dict[str, tuple[int, Callable[[random.Random], tuple[str, str]]]] = {
    "arithmetic": (18, _arithmetic),
    "conversion": (13, _conversion),
    "capital": (7, _capital),
    "spelling": (13, _spelling),
    "advice": (7, _advice),
    "definition": (8, _definition),
    "science": (8, _science),
    "household": (7, _household),
    "language": (12, _language),
    "refusal": (7, _refusal),
}


def family_counts(n: int) -> dict[str, int]:
    """How many of ``n`` examples each family gets: its share, rounded by largest remainder."""
    exact = {name: n * share / 100 for name, (share, _) in FAMILY_SHARES.items()}
    counts = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def generate_safe_pool(n: int = 1200, seed: int = 0) -> list[ChatExample]:
    """``n`` conversations with distinct questions, deterministic for ``seed``; families in :data:`FAMILY_SHARES`.

    Each example's ``metadata`` names its family. The written families hold a few hundred distinct
    questions each, so ``n`` can go up to about 1,350 (beyond that a ValueError names the family).
    """
    rng = random.Random(f"safe-pool-{seed}")
    drawn: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for family, count in family_counts(n).items():
        generate = FAMILY_SHARES[family][1]
        for _ in range(count):
            for _ in range(MAX_TRIES):
                question, answer = generate(rng)
                if question not in seen:
                    break
            else:
                raise ValueError(f"safe-pool family {family!r} ran out of distinct questions before n={n}")
            seen.add(question)
            drawn.append((family, question, answer))
    rng.shuffle(drawn)  # families interleaved, so any prefix or sample is a mix
    return [
        ChatExample(
            ({"role": "user", "content": question}, {"role": "assistant", "content": answer}),
            SOURCE,
            i + 1,
            metadata={"family": family},
        )
        for i, (family, question, answer) in enumerate(drawn)
    ]
