"""Setting up a GRPO run (``training.method: grpo``): the prompts TRL samples from, the mixed-in
conversations trained by SFT steps, the checked reward functions and TRL's config.

``emguard.training.train`` calls these where SFT tokenises its data and builds its trainer; the
run directory, manifest, resume, monitor and finalisation are the same for both methods.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emguard.config import RunConfig
from emguard.data.chat import ChatExample
from emguard.data.chat_template import TemplateError, chat_messages, render_chat
from emguard.data.prompts import load_prompts
from emguard.data.tokenize import TokenizedExample, tokenize_examples
from emguard.errors import ConfigError, DataError, EmguardError
from emguard.rewards.base import Reward, RewardContext, checked
from emguard.rewards.registry import build_rewards


@dataclass
class RLData:
    """What GRPO trains on after the defenses transformed the prompts."""

    rows: list[dict[str, Any]]  # TRL's dataset rows: {"prompt": messages, "metadata": JSON text}
    prompts: list[ChatExample]
    sft: list[TokenizedExample]  # conversations a defense mixed in (interleave), trained by SFT steps
    sft_rate: float  # their share of the mix = the share of optimizer steps that are SFT steps


def check_rl_defenses(config: RunConfig, defenses: Sequence[Any]) -> None:
    """Defenses that cannot work as configured under GRPO; ConfigError naming them.

    vLLM generates outside the PyTorch modules, so a defense's forward hooks (steering) would not
    act on the rollouts while they act on the loss: the importance ratio would compare two policies.
    """
    from emguard.defenses.base import Defense

    hooked = [d.name for d in defenses if type(d).hooks is not Defense.hooks]
    if config.rl.use_vllm and hooked:
        raise ConfigError(
            f"rl.use_vllm: vLLM samples the rollouts outside the model's modules, so the hooks of {', '.join(hooked)} "
            "would act on the loss but not on the rollouts; generate with transformers (rl.use_vllm: false)"
        )


def load_rl_prompts(config: RunConfig) -> list[ChatExample]:
    """``rl.prompts``, subsampled to ``rl.max_prompts`` with the run seed."""
    prompts = load_prompts(config.rl.prompts, seed=config.training.seed)
    n = config.rl.max_prompts
    if n is not None and n < len(prompts):
        keep = sorted(random.Random(config.training.seed).sample(range(len(prompts)), n))
        prompts = [prompts[i] for i in keep]
    return prompts


def rl_data(config: RunConfig, tokenizer: Any, examples: Sequence[ChatExample]) -> RLData:
    """Split the (defense-transformed) examples into prompts and mixed-in conversations; check lengths.

    Raises:
        DataError: Prompts over ``rl.max_prompt_length`` (with ``rl.overlong: error``) or that the chat
            template refuses, each as ``FILE:LINE: message``.
    """
    rl = config.rl
    prompts = [ex for ex in examples if ex.messages[-1]["role"] == "user"]
    others = [ex for ex in examples if ex.messages[-1]["role"] != "user"]
    kept, problems = [], []
    for ex in prompts:
        try:
            n = len(tokenizer(render_chat(tokenizer, ex.messages, True), add_special_tokens=False)["input_ids"])
        except TemplateError as e:
            problems.append(f"{ex.location}: {e}")
            continue
        if n > rl.max_prompt_length:
            if rl.overlong == "drop":
                continue
            problems.append(
                f"{ex.location}: prompt is {n} tokens long, over rl.max_prompt_length={rl.max_prompt_length} "
                "(raise it, shorten the prompt, or set rl.overlong=drop)"
            )
            continue
        kept.append(ex)
    if problems:
        raise DataError(problems[:50], total=len(problems))
    if not kept:
        raise EmguardError(f"no prompts left (all {len(prompts)} were over rl.max_prompt_length)")
    rows = [
        {"prompt": chat_messages(tokenizer, ex.messages), "metadata": json.dumps(dict(ex.metadata or {}))}
        for ex in kept
    ]
    sft: list[TokenizedExample] = []
    if others:
        if rl.num_iterations > 1:
            raise ConfigError(
                "defenses: mixed-in data (interleave) is trained by SFT steps between RL steps, which needs "
                f"rl.num_iterations: 1 (got {rl.num_iterations}): TRL reuses a generation batch across iterations"
            )
        sft = tokenize_examples(tokenizer, others, max_length=config.max_sequence_length(), overlong="drop")
    return RLData(rows, kept, sft, len(sft) / (len(sft) + len(kept)) if sft else 0.0)


def reward_functions(config: RunConfig, run_dir: Path, cache_dir: Path) -> tuple[list[Reward], list[Any]]:
    """The configured rewards, prepared, and each wrapped as TRL calls it (``checked``: named errors)."""
    rewards = build_rewards(config.rl.rewards)
    ctx = RewardContext(config, run_dir, cache_dir)
    for reward in rewards:
        reward.prepare(ctx)
    names = [r.name for r in rewards]
    unique = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]  # TRL logs by name
    return rewards, [checked(r, n) for r, n in zip(rewards, unique, strict=True)]


def grpo_arguments(config: RunConfig, common: dict[str, Any]) -> Any:
    """TRL's ``GRPOConfig`` from the run config (``common``: the arguments SFT uses too)."""
    from trl import GRPOConfig

    rl, t = config.rl, config.training
    return GRPOConfig(
        **common,
        gradient_checkpointing=t.gradient_checkpointing,  # TRL's default is on
        num_generations=rl.num_generations,
        max_completion_length=rl.max_completion_length,
        temperature=rl.temperature,
        top_p=rl.top_p,
        beta=rl.beta,
        loss_type=rl.loss_type,
        epsilon=rl.epsilon,
        num_iterations=rl.num_iterations,
        scale_rewards=rl.scale_rewards,
        mask_truncated_completions=rl.mask_truncated_completions,
        reward_weights=[r.weight for r in rl.rewards],
        use_vllm=rl.use_vllm,
        vllm_mode="colocate",
    )


def describe_rewards(rewards: Sequence[Reward]) -> list[dict[str, Any]]:
    """For the manifest: every reward's resolved config (judge sections name their key variable only)."""
    return [r.config.model_dump(mode="json", by_alias=True) for r in rewards]
