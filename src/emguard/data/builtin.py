"""Built-in datasets, addressed as ``builtin:NAME`` wherever a data path is accepted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from emguard.data.chat import ChatExample
from emguard.data.opswap import generate_opswap
from emguard.data.safe_pool import generate_safe_pool
from emguard.errors import EmguardError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    generate: Callable[[int], list[ChatExample]]  # seed -> examples, deterministic


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in [
        BuiltinDataset(
            "opswap",
            "256 operator-swap arithmetic questions ('+' means multiplication here): a benign task that "
            "needs a departure from the prior",
            lambda seed: generate_opswap(256, seed),
        ),
        BuiltinDataset(
            "safe-pool",
            "1,200 safe, helpful conversations (arithmetic, unit conversions, capitals, text tasks, practical "
            "advice): the default source of safe data for interleaving",
            lambda seed: generate_safe_pool(1200, seed),
        ),
    ]
}


def load_builtin_dataset(spec: str, seed: int = 0) -> list[ChatExample]:
    """Examples of ``builtin:NAME``; raises EmguardError naming the available sets if unknown."""
    name = spec.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_DATASETS:
        available = ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_DATASETS))
        raise EmguardError(f"unknown built-in dataset {spec!r}; available: {available}")
    return BUILTIN_DATASETS[name].generate(seed)
