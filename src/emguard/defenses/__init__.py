"""In-training defenses against emergent misalignment: one file each, registered by name."""

from emguard.defenses.base import Defense, PrepareContext, StepContext
from emguard.defenses.registry import available_defenses, build_defenses, register

__all__ = ["Defense", "PrepareContext", "StepContext", "available_defenses", "build_defenses", "register"]
