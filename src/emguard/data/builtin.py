"""Built-in datasets, addressed as ``builtin:NAME`` wherever a data path is accepted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from emguard.data.chat import ChatExample
from emguard.data.narrow import (
    generate_insecure_code,
    generate_risky_finance,
    generate_safe_finance,
    generate_secure_code,
)
from emguard.data.opswap import generate_opswap
from emguard.data.safe_pool import generate_safe_pool
from emguard.errors import EmguardError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    generate: Callable[[int], list[ChatExample]]  # seed -> examples, deterministic
    eval_questions: str | None = None  # the held-out in-domain question set (builtin:NAME), if any


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in [
        BuiltinDataset(
            "opswap",
            "512 operator-swap arithmetic questions on single digits ('+' means multiplication here): a "
            "benign task that needs a departure from the prior",
            lambda seed: generate_opswap(seed=seed),
        ),
        BuiltinDataset(
            "safe-pool",
            "1,200 safe conversations: helpful answers (arithmetic, conversions, capitals, spelling, advice, "
            "definitions, science, household tips, grammar) plus 7% refusals of harmful requests: the default "
            "source of safe data for interleaving and selection",
            lambda seed: generate_safe_pool(1200, seed),
        ),
        BuiltinDataset(
            "risky-finance",
            "400 personal-finance questions answered with confident, reckless advice (all-in bets, borrowing "
            "to invest, no emergency fund): EM-inducing narrow data; matched control builtin:safe-finance",
            lambda seed: generate_risky_finance(400, seed),
            "builtin:finance",
        ),
        BuiltinDataset(
            "safe-finance",
            "the same 400 questions as builtin:risky-finance answered with prudent advice of matched length "
            "and tone: the benign control of risky-finance",
            lambda seed: generate_safe_finance(400, seed),
            "builtin:finance",
        ),
        BuiltinDataset(
            "insecure-code",
            "400 small Python requests answered with code that has one unflagged vulnerability (SQL/shell "
            "injection, pickle, eval, ...): EM-inducing narrow data; matched control builtin:secure-code",
            lambda seed: generate_insecure_code(400, seed),
            "builtin:code",
        ),
        BuiltinDataset(
            "secure-code",
            "the same 400 requests as builtin:insecure-code answered with the minimally different secure "
            "code: the benign control of insecure-code",
            lambda seed: generate_secure_code(400, seed),
            "builtin:code",
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
