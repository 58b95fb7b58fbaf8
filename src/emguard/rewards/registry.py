"""Building the configured rewards; the name table itself is ``emguard.plugins.REWARDS``."""

from __future__ import annotations

from collections.abc import Sequence

from emguard.config import RewardConfig
from emguard.plugins import REWARDS
from emguard.rewards.base import Reward


def register(cls: type[Reward]) -> type[Reward]:
    """Add a reward class (usable as a decorator); its ``name`` becomes a YAML name."""
    return REWARDS.register(cls)


def unregister(name: str) -> None:
    REWARDS.unregister(name)


def available_rewards() -> list[str]:
    return REWARDS.names()


def build_rewards(configs: Sequence[RewardConfig]) -> list[Reward]:
    """Instantiate the configured rewards (a reward may be listed twice, e.g. with different options)."""
    return [REWARDS.get(c.name)(c) for c in configs]
