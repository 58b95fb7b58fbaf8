"""Building the configured defenses; the name table itself is ``emguard.plugins.DEFENSES``."""

from __future__ import annotations

from collections.abc import Sequence

from emguard.config import DefenseConfig
from emguard.defenses.base import Defense
from emguard.errors import ConfigError
from emguard.plugins import DEFENSES


def register(cls: type[Defense]) -> type[Defense]:
    """Add a defense class (usable as a decorator); its ``name`` becomes a YAML name."""
    return DEFENSES.register(cls)


def unregister(name: str) -> None:
    DEFENSES.unregister(name)


def available_defenses() -> list[str]:
    return DEFENSES.names()


def defense_config_class(name: str) -> type[DefenseConfig]:
    """The config class of defense ``name``; ValueError naming the known defenses otherwise."""
    return DEFENSES.config_class(name)


def build_defenses(configs: Sequence[DefenseConfig]) -> list[Defense]:
    """Instantiate the configured defenses and check that they can run together.

    ``none`` stands for "no defense" and is dropped; an empty list is plain SFT.

    Raises:
        ConfigError: A defense listed twice, ``none`` beside real defenses, or a pair that
            declares itself incompatible.
    """
    names = [c.name for c in configs]
    if "none" in names and len(names) > 1:
        raise ConfigError(
            f"defenses: 'none' means no defense and cannot be combined with {sorted(set(names) - {'none'})}"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"defenses: {', '.join(duplicates)} listed more than once; give each defense once")
    defenses = [DEFENSES.get(c.name)(c) for c in configs if c.name != "none"]
    for a in defenses:
        for b in defenses:
            why = a.incompatible_with.get(b.name)
            if why:
                raise ConfigError(f"defenses: {a.name} cannot be combined with {b.name}: {why}")
    return defenses
