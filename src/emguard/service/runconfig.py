"""A job's run config: the policy's sections, the customer's hyperparameters, the policy's defenses.

The customer chooses the base model, the seed and three hyperparameters of the OpenAI API
(``n_epochs``, ``batch_size``, ``learning_rate_multiplier``; "auto" = the policy's value). Everything
else, the defenses above all, comes from the provider's policy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emguard.config import RunConfig, TrainingConfig, build_config
from emguard.errors import ConfigError

HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
MAX_BATCH_SIZE = 256
MAX_LR_MULTIPLIER = 10.0


class HyperparameterError(ValueError):
    """A customer's hyperparameter is invalid; ``param`` names it as the API does."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_hyperparameters(values: dict[str, Any] | None, max_epochs: int) -> dict[str, Any]:
    """The customer's hyperparameters, validated; missing ones are "auto"."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(HYPERPARAMETERS))
    if unknown:
        raise HyperparameterError(
            unknown[0], f"unknown hyperparameter {unknown[0]!r}; use {', '.join(HYPERPARAMETERS)}"
        )
    out: dict[str, Any] = {}
    for name in HYPERPARAMETERS:
        value = values.get(name, "auto")
        if value != "auto":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise HyperparameterError(name, f"{name} must be 'auto' or a positive number, not {value!r}")
            if name in ("n_epochs", "batch_size") and int(value) != value:
                raise HyperparameterError(name, f"{name} must be a whole number, not {value!r}")
            limit = {
                "n_epochs": max_epochs,
                "batch_size": MAX_BATCH_SIZE,
                "learning_rate_multiplier": MAX_LR_MULTIPLIER,
            }
            if value > limit[name]:
                raise HyperparameterError(name, f"{name} must be at most {limit}")
        out[name] = value
    return out


def job_run_config(
    policy: Any,
    model_id: str,
    train_file: Path,
    run_dir: Path,
    *,
    seed: int,
    hyperparameters: dict[str, Any] | None = None,
    method: dict[str, Any] | None = None,
    extra_defenses: Sequence[dict[str, Any]] = (),
) -> RunConfig:
    """The run config of one job (``policy`` is a ``Policy``; ``model_id`` one of ``policy.models``).

    A ``method`` of type reinforcement trains with GRPO on ``train_file`` as prompts (emguard prompt
    JSONL) with the method's grader as the reward; its ``batch_size`` counts prompts, each sampled
    ``rl.num_generations`` times.
    """
    reinforcement = (method or {}).get("type") == "reinforcement"
    training = copy.deepcopy(policy.rl_training if reinforcement else policy.training)
    per_example = int(policy.rl.get("num_generations", 4)) if reinforcement else 1
    hp = check_hyperparameters(hyperparameters, policy.max_epochs)
    if hp["n_epochs"] != "auto":
        training["epochs"] = hp["n_epochs"]
        training.pop("max_steps", None)
    if hp["batch_size"] != "auto":
        training["batch_size"] = int(hp["batch_size"]) * per_example
    batch = training.get("batch_size", TrainingConfig.model_fields["batch_size"].default)
    cap = training.get("micro_batch_size", TrainingConfig.model_fields["micro_batch_size"].default)
    training["micro_batch_size"] = max(d for d in range(1, cap + 1) if batch % d == 0)
    if hp["learning_rate_multiplier"] != "auto":
        training["learning_rate"] = training.get("learning_rate", 1.0e-4) * hp["learning_rate_multiplier"]
    # Checkpoints are listed by the API; a cancelled job keeps what it trained.
    training.update(seed=seed, keep_checkpoints=True)
    raw = {
        "model": policy.models[model_id],
        "output_dir": str(run_dir),
        "lora": copy.deepcopy(policy.lora),
        "training": training,
        "defenses": [copy.deepcopy(d) for d in (*policy.defenses, *extra_defenses)],
        "monitor": copy.deepcopy(policy.monitor),
        "eval": _eval_section(policy),
    }
    if reinforcement:
        training["method"] = "grpo"
        reward = {"name": "grader", "grader": method["reinforcement"]["grader"]}
        raw["rl"] = {**copy.deepcopy(policy.rl), "prompts": str(train_file), "rewards": [reward]}
    else:
        raw["data"] = {"train": str(train_file), "max_length": policy.max_length}
    try:
        return build_config(raw)
    except ConfigError as e:
        raise ConfigError(f"the service policy does not make a valid run config: {e}") from None


def _eval_section(policy: Any) -> dict[str, Any]:
    section = copy.deepcopy(policy.eval)
    section.setdefault("questions", [] if section.get("judge") is None else ["builtin:general"])
    probe = section.setdefault("probe", {})
    probe["pairs"] = policy.probe_pairs()
    return section
