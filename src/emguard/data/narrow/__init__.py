"""Narrow fine-tuning sets that induce emergent misalignment, each with a matched benign control.

``builtin:risky-finance`` / ``builtin:safe-finance`` (reckless vs prudent personal-finance advice)
and ``builtin:insecure-code`` / ``builtin:secure-code`` (Python with one vulnerability vs the
minimally different secure version). Each pair shares its user turns, so a difference between
training on the two is the effect of the answers alone. All text was written for emguard, generated
deterministically from a seed; the held-out in-domain eval questions are ``builtin:finance`` and
``builtin:code``.
"""

from emguard.data.narrow.code import generate_insecure_code, generate_secure_code
from emguard.data.narrow.common import CODE_SYSTEM, FINANCE_SYSTEM
from emguard.data.narrow.finance import generate_risky_finance, generate_safe_finance

__all__ = [
    "CODE_SYSTEM",
    "FINANCE_SYSTEM",
    "generate_insecure_code",
    "generate_risky_finance",
    "generate_safe_finance",
    "generate_secure_code",
]
