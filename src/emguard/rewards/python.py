"""``python``: any function ``module:function`` with TRL's reward-function signature.

The function is called exactly as TRL calls a reward: ``f(prompts=..., completions=...,
completion_ids=..., **kwargs)`` with one entry per completion (``completions[i]`` is a list of
messages for chat prompts), ``kwargs`` holding the dataset's other columns (``metadata``, as JSON
text), ``trainer_state`` and TRL's logging helpers; it returns one float (or None) per completion.
Like ``model_options.trust_remote_code``, naming a module runs its code: only name code you trust.
The module must be importable (installed, or on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator

from emguard.config import RewardConfig
from emguard.errors import ConfigError
from emguard.rewards.base import Reward, RewardContext


class PythonRewardConfig(RewardConfig):
    name: Literal["python"] = "python"
    function: str = Field(description="module:function, importable in the training process.")

    @field_validator("function")
    @classmethod
    def _module_and_name(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"expected module:function (e.g. my_rewards:length_penalty), got {value!r}")
        return value


def import_function(spec: str) -> Callable[..., Any]:
    """The callable ``module:function`` names; ConfigError saying what is missing otherwise."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"rl.rewards: cannot import {module_name!r} for {spec!r}: {e}; is it on PYTHONPATH?"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"rl.rewards: {module_name!r} has no function {attr!r}")
    return fn


class PythonReward(Reward):
    name = "python"
    config_class = PythonRewardConfig
    config: PythonRewardConfig

    def __init__(self, config: PythonRewardConfig):
        super().__init__(config)
        self.function: Callable[..., Any] | None = None

    def prepare(self, ctx: RewardContext) -> None:
        self.function = import_function(self.config.function)

    def __call__(self, prompts: list, completions: list, completion_ids: list, **kwargs: Any) -> list[float | None]:
        if self.function is None:
            self.function = import_function(self.config.function)
        return self.function(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
