"""Defense names as written in YAML -> defense classes. The only place that knows them all."""

from __future__ import annotations

from collections.abc import Sequence

from emguard.config import DefenseConfig
from emguard.defenses.base import Defense
from emguard.defenses.inoculation import InoculationDefense
from emguard.defenses.interleave import InterleaveDefense
from emguard.defenses.kl import KLDefense
from emguard.defenses.ldifs import LDIFSDefense
from emguard.defenses.none import NoDefense
from emguard.defenses.safelora import SafeLoRADefense
from emguard.defenses.steering import SteeringDefense
from emguard.errors import ConfigError

_REGISTRY: dict[str, type[Defense]] = {
    cls.name: cls
    for cls in [
        NoDefense,
        KLDefense,
        LDIFSDefense,
        SteeringDefense,
        InoculationDefense,
        InterleaveDefense,
        SafeLoRADefense,
    ]
}


def register(cls: type[Defense]) -> type[Defense]:
    """Add a defense class (usable as a decorator); its ``name`` becomes a YAML name."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a defense named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def available_defenses() -> list[str]:
    return sorted(_REGISTRY)


def defense_config_class(name: str) -> type[DefenseConfig]:
    """The config class of defense ``name``; ValueError naming the known defenses otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown defense {name!r}; available: {', '.join(available_defenses())}")
    return _REGISTRY[name].config_class


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
    defenses = [_REGISTRY[c.name](c) for c in configs if c.name != "none"]
    for a in defenses:
        for b in defenses:
            why = a.incompatible_with.get(b.name)
            if why:
                raise ConfigError(f"defenses: {a.name} cannot be combined with {b.name}: {why}")
    return defenses
