"""Reward functions for GRPO (``training.method: grpo``): one file each, registered by name."""

from emguard.rewards.base import Reward, RewardContext, RewardError
from emguard.rewards.registry import available_rewards, build_rewards, register

__all__ = ["Reward", "RewardContext", "RewardError", "available_rewards", "build_rewards", "register"]
