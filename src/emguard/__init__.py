"""emguard: fine-tune aligned chat models on narrow data without emergent misalignment.

The public API. Names are imported on first use, so ``import emguard`` (and the CLI) start fast
and torch is only loaded when something needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "emguard.config",
    "load_config": "emguard.config",
    "build_config": "emguard.config",
    "EmguardError": "emguard.errors",
    "ConfigError": "emguard.errors",
    "DataError": "emguard.errors",
    "ChatExample": "emguard.data.chat",
    "read_chat_jsonl": "emguard.data.chat",
    "load_examples": "emguard.data.sources",
    "check_files": "emguard.data.check",
    "tokenize_conversation": "emguard.data.tokenize",
    "tokenize_examples": "emguard.data.tokenize",
    "Defense": "emguard.defenses.base",
    "register_defense": "emguard.defenses.registry",
    "available_defenses": "emguard.defenses.registry",
    "resolve_model": "emguard.models",
    "load_model": "emguard.models",
    "load_tokenizer": "emguard.models",
    "attach_lora": "emguard.models",
    "train": "emguard.training",
    "TrainResult": "emguard.training",
    "EmguardTrainer": "emguard.trainer",
    "run_demo": "emguard.demo",
    "evaluate": "emguard.evaluation.evaluate",
    "EvalResult": "emguard.evaluation.evaluate",
    "load_questions": "emguard.evaluation.questions",
    "load_pairs": "emguard.evaluation.probe",
    "compute_metrics": "emguard.evaluation.metrics",
    "load_judged": "emguard.evaluation.judged",
    "build_judge": "emguard.evaluation.judges",
    "HFGenerator": "emguard.evaluation.generation",
    "run_select": "emguard.selection",
    "score_pool": "emguard.selection",
    "perplexity_gap": "emguard.selection",
    "answer_nll": "emguard.likelihood",
    "extract_persona": "emguard.persona",
    "load_trait": "emguard.persona",
    "response_activations": "emguard.persona",
    "screen_dataset": "emguard.persona",
    "run_screen": "emguard.persona",
    "load_sweep": "emguard.sweep",
    "run_sweep": "emguard.sweep",
    "write_report": "emguard.report",
    "EMMonitorCallback": "emguard.monitor",
}
_RENAMED = {"register_defense": "register"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
