"""Names as written in YAML -> the classes behind them, for defenses and rewards alike.

A table maps each built-in name to ``"module:Class"`` and imports the module on first use, so this
file imports nothing of emguard: ``config`` sits *above* it (it looks up each entry's config class
here while validating) and every defense or reward module sits above ``config``. The import graph
has no circle; the only back-reference is the deferred import of a name that is actually used.

Each registered class has ``name`` (its YAML name) and ``config_class`` (the pydantic model of its
config section).
"""

from __future__ import annotations

import importlib
from typing import Any


class Plugins:
    """One kind of named plugin (``defense``, ``reward``)."""

    def __init__(self, kind: str, builtin: dict[str, str]):
        self.kind = kind
        self._paths = dict(builtin)  # name -> "module:Class", imported on first use
        self._classes: dict[str, type] = {}

    def names(self) -> list[str]:
        return sorted({*self._paths, *self._classes})

    def get(self, name: str) -> type:
        """The class registered as ``name``; ValueError naming the known ones otherwise."""
        if name not in self._classes:
            if name not in self._paths:
                raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
            module, _, attr = self._paths[name].partition(":")
            self._classes[name] = getattr(importlib.import_module(module), attr)
        return self._classes[name]

    def config_class(self, name: str) -> Any:
        return self.get(name).config_class

    def register(self, cls: type) -> type:
        """Add a class (usable as a decorator); its ``name`` becomes a YAML name."""
        name = cls.name  # type: ignore[attr-defined]
        if name in self.names() and self.get(name) is not cls:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self.get(name).__name__})")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Forget a class added with ``register`` (a built-in name comes back as built in)."""
        self._classes.pop(name, None)


DEFENSES = Plugins(
    "defense",
    {
        "none": "emguard.defenses.none:NoDefense",
        "kl": "emguard.defenses.kl:KLDefense",
        "ldifs": "emguard.defenses.ldifs:LDIFSDefense",
        "steering": "emguard.defenses.steering:SteeringDefense",
        "inoculation": "emguard.defenses.inoculation:InoculationDefense",
        "interleave": "emguard.defenses.interleave:InterleaveDefense",
        "safelora": "emguard.defenses.safelora:SafeLoRADefense",
    },
)

REWARDS = Plugins(
    "reward",
    {
        "opswap": "emguard.rewards.opswap:OpswapReward",
        "finance": "emguard.rewards.finance:FinanceReward",
        "code_security": "emguard.rewards.code_security:CodeSecurityReward",
        "judge": "emguard.rewards.judge:JudgeReward",
        "python": "emguard.rewards.python:PythonReward",
        "grader": "emguard.rewards.grader:GraderReward",
    },
)
