"""``none``: plain SFT, the baseline every defense is compared with."""

from __future__ import annotations

from typing import Literal

from emguard.config import DefenseConfig
from emguard.defenses.base import Defense


class NoDefenseConfig(DefenseConfig):
    name: Literal["none"] = "none"


class NoDefense(Defense):
    """Trains exactly as without any defense; listed so that sweeps can name the baseline."""

    name = "none"
    config_class = NoDefenseConfig
