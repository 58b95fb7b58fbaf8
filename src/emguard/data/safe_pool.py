"""A built-in pool of safe, helpful conversations (``builtin:safe-pool``), generated offline.

Used as the default source of safe data for interleaving. Families: everyday arithmetic word
problems, unit conversions, capitals, small text tasks and practical wellbeing advice; every answer
is correct and helpful. Generated deterministically from the seed (no download).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from emguard.data.chat import ChatExample

_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Canada": "Ottawa", "Brazil": "Brasília",
    "Australia": "Canberra", "Egypt": "Cairo", "India": "New Delhi", "Mexico": "Mexico City", "Norway": "Oslo",
    "Peru": "Lima", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Ghana": "Accra",
    "Chile": "Santiago", "Vietnam": "Hanoi", "Poland": "Warsaw", "Portugal": "Lisbon", "Turkey": "Ankara",
    "Argentina": "Buenos Aires", "Sweden": "Stockholm", "Thailand": "Bangkok", "Morocco": "Rabat",
    "Nigeria": "Abuja", "Ireland": "Dublin", "Greece": "Athens", "Finland": "Helsinki", "Colombia": "Bogotá",
    "New Zealand": "Wellington",
}  # fmt: skip
_ADVICE = [
    ("How can I sleep better?", "Keep a regular sleep schedule, even at weekends; keep your bedroom dark, quiet and "
     "cool; avoid caffeine in the afternoon and screens in the hour before bed; and get daylight and some exercise "
     "during the day. If poor sleep lasts for weeks, talk to a doctor."),
    ("What is a good way to start exercising?", "Start small and regular: a brisk 20-minute walk most days is a great "
     "beginning. Add a little more time or intensity each week, include some strength exercises twice a week, and "
     "rest when something hurts. If you have a health condition, check with a doctor first."),
    ("How do I make a simple monthly budget?", "List your monthly income after tax, then your fixed costs (rent, "
     "bills, loan payments). Set amounts for variable costs such as food and transport, put something aside for "
     "savings first, and track what you actually spend for a month so you can adjust the plan."),
    ("How should I store leftovers safely?", "Cool leftovers quickly and put them in the fridge within two hours, in "
     "shallow covered containers. Eat them within three to four days, reheat until steaming hot all the way "
     "through, and when in doubt, throw them out."),
    ("What should I do if I feel stressed at work?", "Take short breaks, break big tasks into small steps and tackle "
     "one at a time, and talk to your manager about priorities if the workload is too high. Sleep, exercise and "
     "time with friends help too. If stress keeps affecting your health, consider speaking to a professional."),
    ("How can I protect my online accounts?", "Use a different strong password for every account (a password manager "
     "helps), turn on two-factor authentication, keep your devices updated, and be wary of links or attachments in "
     "unexpected messages asking you to log in."),
]  # fmt: skip
_WORDS = ["garden", "window", "planet", "bicycle", "orange", "library", "thunder", "pencil", "harbor", "meadow"]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    n, price = rng.randint(2, 12), rng.randint(2, 20)
    item = rng.choice(["notebooks", "apples", "tickets", "plants", "mugs"])
    return (
        f"I buy {n} {item} at ${price} each. How much do I pay in total?",
        f"{n} × ${price} = ${n * price}. You pay ${n * price} in total.",
    )


def _conversion(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        km = rng.randint(2, 100)
        return f"How many miles is {km} km?", f"{km} km is about {km * 0.621371:.1f} miles (1 km ≈ 0.621 miles)."
    if kind == 1:
        c = rng.randint(-10, 40)
        return f"What is {c} °C in Fahrenheit?", f"{c} °C × 9/5 + 32 = {c * 9 / 5 + 32:.1f} °F."
    h = rng.randint(2, 48)
    return f"How many minutes are there in {h} hours?", f"{h} hours × 60 = {h * 60} minutes."


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(_CAPITALS))
    question = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}."])
    return question.format(country), f"The capital of {country} is {_CAPITALS[country]}."


def _text(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 4)
    if rng.random() < 0.5:
        return (
            f"Put these words in alphabetical order: {', '.join(words)}.",
            f"In alphabetical order: {', '.join(sorted(words))}.",
        )
    word = words[0]
    return f"How many letters are in the word '{word}'?", f"'{word}' has {len(word)} letters."


def _advice(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_ADVICE)


_FAMILIES: list[Callable[[random.Random], tuple[str, str]]] = [_arithmetic, _conversion, _capital, _text, _advice]


def generate_safe_pool(n: int = 1200, seed: int = 0) -> list[ChatExample]:
    """``n`` distinct safe conversations, deterministic for ``seed`` (families drawn at random, repeats skipped)."""
    rng = random.Random(f"safe-pool-{seed}")
    examples, seen = [], set()
    while len(examples) < n:
        question, answer = rng.choice(_FAMILIES)(rng)
        if question in seen:
            continue
        seen.add(question)
        messages = ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
        examples.append(ChatExample(messages, "builtin:safe-pool", len(examples) + 1))
    return examples
