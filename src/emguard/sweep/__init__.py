"""Sweeps: a grid of datasets × defense variants × seeds, each cell a train + eval run directory."""

from emguard.sweep.runner import SweepResult, run_sweep
from emguard.sweep.spec import SweepSpec, expand, load_sweep

__all__ = ["SweepResult", "SweepSpec", "expand", "load_sweep", "run_sweep"]
