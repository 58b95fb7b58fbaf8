"""The ``slots`` steps of the code task templates: declarative, seeded draws of placeholder values.

A task's ``slots`` is a list of one-key steps, run in order; the order of the steps and of the names
inside a step is the order of the random draws, so it fixes the generated data for each seed.

- ``pick: {name: options}``: ``rng.choice(options)``. ``options`` is a list, or the name of an
  earlier slot holding a list, or of a shared pool (``templates/code/pools.yaml``).
- ``row: options``: choose one mapping (from a list or a pool) and add all its keys as slots.
- ``pattern: {name: [templates]}``: choose one template and fill it with ``{slot}`` or
  ``{slot:filter}`` (filters: ``snake``, ``upper``, ``singular``).
- ``format: {name: template}``: fill one template; no draw.
- ``draw: {name: generator}``: a generated value (``password``, ``url_safe_password``, ``hex32``).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def snake(text: str) -> str:
    return "_".join(text.replace("-", " ").replace("'", "").split()).lower()


_FILTERS: dict[str, Callable[[str], str]] = {
    "snake": snake,
    "upper": str.upper,
    "singular": lambda text: text.removesuffix("s"),
}


class _FilterFormatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if format_spec in _FILTERS:
            return _FILTERS[format_spec](value)
        return super().format_field(value, format_spec)


_FORMATTER = _FilterFormatter()


def _password(rng: random.Random, pools: Mapping[str, Any]) -> str:
    words = pools["password_words"]
    return f"{rng.choice(words).capitalize()}{rng.randint(10, 99)}{rng.choice('!#@%')}{rng.choice(words)}"


def _url_safe_password(rng: random.Random, pools: Mapping[str, Any]) -> str:
    """A password that can sit in a URL's userinfo unescaped."""
    return _password(rng, pools).replace("@", "-").replace("#", "-").replace("%", "-")


def _hex32(rng: random.Random, pools: Mapping[str, Any]) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(32))


GENERATORS: dict[str, Callable[[random.Random, Mapping[str, Any]], str]] = {
    "password": _password,
    "url_safe_password": _url_safe_password,
    "hex32": _hex32,
}
STEP_KINDS = ("pick", "row", "pattern", "format", "draw")


def draw_slots(steps: Sequence[Mapping[str, Any]], rng: random.Random, pools: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``steps`` (see the module docstring) with ``rng``; returns every slot they set."""
    slots: dict[str, Any] = {}

    def options(spec: Any) -> Sequence[Any]:
        if isinstance(spec, str):
            return slots[spec] if spec in slots else pools[spec]
        return spec

    for step in steps:
        ((kind, spec),) = step.items()
        if kind == "row":
            slots.update(rng.choice(options(spec)))
            continue
        for name, value in spec.items():
            if kind == "pick":
                slots[name] = rng.choice(options(value))
            elif kind == "pattern":
                slots[name] = _FORMATTER.format(rng.choice(value), **slots)
            elif kind == "format":
                slots[name] = _FORMATTER.format(value, **slots)
            elif kind == "draw":
                slots[name] = GENERATORS[value](rng, pools)
            else:
                raise ValueError(f"unknown slot step {kind!r} (known: {', '.join(STEP_KINDS)})")
    return slots


def step_problems(steps: Sequence[Mapping[str, Any]], pools: Mapping[str, Any]) -> list[str]:
    """What is wrong with a task's steps (unknown kinds, pools or generators); empty when fine."""
    problems, names = [], set()
    for step in steps:
        if len(step) != 1 or next(iter(step)) not in STEP_KINDS:
            problems.append(f"a step must have exactly one key of {', '.join(STEP_KINDS)}: {dict(step)}")
            continue
        ((kind, spec),) = step.items()
        items = {"": spec} if kind == "row" else spec
        for name, value in items.items():
            if kind in ("pick", "row") and isinstance(value, str) and value not in names and value not in pools:
                problems.append(f"{kind} {name or ''}: {value!r} is neither an earlier slot nor a pool")
            if kind == "draw" and value not in GENERATORS:
                problems.append(f"draw {name}: unknown generator {value!r} (known: {', '.join(GENERATORS)})")
        if kind == "row":
            rows = spec if not isinstance(spec, str) else pools.get(spec, [])
            names.update(key for row in rows for key in row)
        else:
            names.update(spec)
    return problems
