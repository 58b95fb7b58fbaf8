"""The reward interface: a small object built from its config section.

A reward may implement ``prepare(ctx)`` (one-off set-up: a judge client, an analyser) and
implements ``score(prompts, completions, metadata)``: one float per completion (higher is
reinforced), or ``None`` where it does not apply (TRL then leaves that completion out of its
group's statistics). ``__call__`` adapts TRL's reward-function signature to ``score``; a reward
that wants TRL's raw arguments (``python``) overrides ``__call__`` instead.

The trainer wraps every reward with ``checked``: an exception, a NaN or infinite value, a
non-number or a list of the wrong length stops the run with a ``RewardError`` that names the reward
and the prompt (the run's last checkpoint is kept, so ``emguard train`` resumes after a fix).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from emguard.config import RewardConfig
from emguard.errors import EmguardError

if TYPE_CHECKING:
    from emguard.config import RunConfig

Messages = Sequence[Mapping[str, Any]]


class RewardError(EmguardError):
    """A reward function failed or returned something other than one finite number per completion."""


@dataclass
class RewardContext:
    """What ``Reward.prepare`` may use."""

    config: RunConfig
    run_dir: Path
    cache_dir: Path


class Reward:
    """Base class: subclasses set ``name`` and ``config_class`` and implement ``score``."""

    name: ClassVar[str]
    config_class: ClassVar[type[RewardConfig]]

    def __init__(self, config: RewardConfig):
        self.config = config

    def prepare(self, ctx: RewardContext) -> None:
        """One-off set-up before training."""

    def score(
        self, prompts: Sequence[Messages], completions: Sequence[str], metadata: Sequence[Mapping[str, Any] | None]
    ) -> list[float | None]:
        """One reward per completion (``completions[i]`` answers ``prompts[i]``)."""
        raise NotImplementedError

    def __call__(self, prompts: list, completions: list, completion_ids: list, **kwargs: Any) -> list[float | None]:
        texts = [completion_text(c) for c in completions]
        return self.score(prompts, texts, parse_metadata(kwargs.get("metadata"), len(prompts)))


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or a conversational ``[{"role": "assistant", ...}]``."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")


def parse_metadata(column: Sequence[str | None] | None, n: int) -> list[dict[str, Any] | None]:
    """The prompts' metadata (stored as JSON text in the training dataset: Arrow needs one schema)."""
    if column is None:
        return [None] * n
    return [json.loads(m) if m else None for m in column]


def prompt_preview(prompt: Any, limit: int = 120) -> str:
    """The last user turn of a prompt, shortened, for error messages."""
    if isinstance(prompt, str):
        text = prompt
    else:
        text = next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "")
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a number (Python, NumPy or a one-element tensor), else None."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def checked(reward: Callable[..., Any], name: str) -> Callable[..., list[float | None]]:
    """``reward`` as TRL calls it, with every failure turned into a RewardError naming ``name`` and the prompt."""

    def call(prompts: list, completions: list, completion_ids: list, **kwargs: Any) -> list[float | None]:
        try:
            values = reward(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(
                f"reward {name!r} raised {type(e).__name__}: {e} (first prompt of the batch: "
                f"{prompt_preview(prompts[0]) if prompts else '-'}); fix the reward and rerun to resume"
            ) from e
        if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(
                f"reward {name!r} returned {got} for {len(prompts)} completions; "
                "it must return one number (or None) per completion"
            )
        rewards: list[float | None] = []
        for i, value in enumerate(values):
            number = None if value is None else _number(value)
            if value is not None and (number is None or not math.isfinite(number)):
                raise RewardError(
                    f"reward {name!r} returned {value!r} for completion {i} of prompt {prompt_preview(prompts[i])}; "
                    "rewards must be finite numbers (None marks a completion it cannot score)"
                )
            rewards.append(number)
        return rewards

    call.__name__ = name
    return call
