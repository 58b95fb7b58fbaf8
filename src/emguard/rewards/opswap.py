"""``opswap``: exact match on the operator-swap task, the benign verifiable RL task of criterion (c).

Reward 1 when the last integer of the completion is the value under the prompt's redefinition
(``metadata.answer``, set by ``builtin:opswap-prompts``), else 0: the scoring of the held-out
benign evaluation (``emguard.evaluation.opswap_eval.is_correct``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from emguard.config import RewardConfig
from emguard.evaluation.opswap_eval import is_correct
from emguard.rewards.base import Messages, Reward, RewardError, prompt_preview


class OpswapRewardConfig(RewardConfig):
    name: Literal["opswap"] = "opswap"


class OpswapReward(Reward):
    name = "opswap"
    config_class = OpswapRewardConfig

    def score(
        self, prompts: Sequence[Messages], completions: Sequence[str], metadata: Sequence[Mapping[str, Any] | None]
    ) -> list[float | None]:
        rewards: list[float | None] = []
        for prompt, completion, meta in zip(prompts, completions, metadata, strict=True):
            if not meta or "answer" not in meta:
                raise RewardError(
                    f"reward 'opswap' needs metadata.answer (an integer) on every prompt; {prompt_preview(prompt)} "
                    "has none (builtin:opswap-prompts sets it)"
                )
            rewards.append(1.0 if is_correct(completion, int(meta["answer"])) else 0.0)
        return rewards
