"""Interleaving++ data selection: score safe candidates by the perplexity gap between the aligned
model and misaligned fine-tunes, drop refusals, keep the top."""

from emguard.selection.perplexity_gap import PoolScores, perplexity_gap, refusal_test, score_pool
from emguard.selection.select import SelectResult, run_select

__all__ = ["PoolScores", "SelectResult", "perplexity_gap", "refusal_test", "run_select", "score_pool"]
