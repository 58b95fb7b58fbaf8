"""GRPO (``training.method: grpo``) on TRL's GRPOTrainer: the run, the defenses under RL, resume, bad rewards."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import forward_hook_count, kill_train_after_first_checkpoint, tiny_run_config
from emguard.config import DefenseConfig, build_config
from emguard.data.collate import ChatCollator
from emguard.data.sources import load_examples
from emguard.data.tokenize import tokenize_conversation
from emguard.defenses.base import Defense, PrepareContext
from emguard.defenses.registry import build_defenses, register, unregister
from emguard.grpo_trainer import EmguardGRPOTrainer, completion_batch, is_sft_step
from emguard.losses import IGNORE_INDEX
from emguard.rewards.base import RewardError
from emguard.rundir import CHECKPOINT_DONE
from emguard.training import train, training_arguments


@pytest.fixture(autouse=True)
def _reward_module(tmp_path, monkeypatch):
    """``grpo_rewards:length`` (varied rewards, so GRPO has advantages) and rewards that fail on cue."""
    (tmp_path / "grpo_rewards.py").write_text(
        "import math\n"
        "def length(prompts, completions, completion_ids, **kwargs):\n"
        "    return [len(ids) / 8 + (i % 3) / 10 for i, ids in enumerate(completion_ids)]\n"
        "def fails_at_step_3(prompts, completions, completion_ids, trainer_state, **kwargs):\n"
        "    if trainer_state.global_step >= 2:\n"
        "        raise ZeroDivisionError('boom')\n"
        "    return length(prompts, completions, completion_ids)\n"
        "def record_prompts(prompts, completions, completion_ids, **kwargs):\n"
        f"    with open({str(tmp_path / 'prompts.jsonl')!r}, 'a') as f:\n"
        "        f.write(__import__('json').dumps(prompts[0]) + '\\n')\n"
        "    return length(prompts, completions, completion_ids)\n"
        "def nan_at_step_3(prompts, completions, completion_ids, trainer_state, **kwargs):\n"
        "    values = length(prompts, completions, completion_ids)\n"
        "    return [math.nan] + values[1:] if trainer_state.global_step >= 2 else values\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("grpo_rewards", None)


def grpo_config(run_dir, model_dir, *, defenses=None, reward="grpo_rewards:length", rl=None, monitor=None, **training):
    return build_config(
        {
            "monitor": monitor or {},
            "model": str(model_dir),
            "output_dir": str(run_dir),
            "lora": {"r": 4, "alpha": 8},
            "training": {
                "method": "grpo",
                "max_steps": 3,
                "batch_size": 8,
                "micro_batch_size": 4,
                "learning_rate": 1e-3,
                "save_steps": 100,
                "warmup_steps": 0,
                **training,
            },
            "rl": {
                "prompts": "builtin:opswap-prompts",
                "max_prompts": 32,
                "num_generations": 4,
                "max_completion_length": 8,
                "rewards": [{"name": "python", "function": reward}, {"name": "opswap", "weight": 0.5}],
                **(rl or {}),
            },
            "defenses": defenses or [],
        }
    )


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_grpo_writes_the_run_directory_with_the_reward_curve_and_the_monitor(tmp_path, tiny_model_dir):
    config = grpo_config(tmp_path / "run", tiny_model_dir, monitor={"every": 2, "max_pairs": 4})
    result = train(config, progress=False)
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["data"]["method"] == "grpo"
    assert manifest["data"]["prompts"]["prompts"] == 32 and manifest["data"]["sft_steps_data"]["examples"] == 0
    assert [r["name"] for r in manifest["data"]["rewards"]] == ["python", "opswap"]
    steps = [r for r in _log(run) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all({"reward", "rewards/python/mean", "rewards/opswap/mean"} <= set(r) for r in steps)
    assert [r["step"] for r in _log(run) if "monitor/probe_shift" in r] == [2, 3]  # every 2 steps and the last
    assert result.steps == 3 and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert result.first_reward == steps[0]["reward"] and result.final_reward == steps[-1]["reward"]
    lora = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(float(t.abs().sum()) > 0 for k, t in lora.items() if "lora_B" in k)  # the policy moved


def test_interleave_under_grpo_replaces_rl_steps_by_sft_steps_at_the_configured_rate(tmp_path, tiny_model_dir):
    assert sum(is_sft_step(s, 0.05) for s in range(100)) == 5
    assert [s for s in range(8) if is_sft_step(s, 0.25)] == [3, 7]
    defenses = [{"name": "interleave", "fraction": 0.25, "source": "builtin:safe-pool"}]
    config = grpo_config(tmp_path / "run", tiny_model_dir, defenses=defenses, max_steps=8)
    train(config, progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    safe = manifest["data"]["sft_steps_data"]
    assert safe["examples"] > 0 and safe["rate"] == pytest.approx(0.25, abs=0.01)  # 11 of 43
    steps = [r for r in _log(tmp_path / "run") if "loss" in r]
    sft = [r["step"] for r in steps if "interleave/sft_loss" in r]
    rl = [r["step"] for r in steps if "reward" in r and "interleave/sft_loss" not in r]
    rate = safe["rate"]
    assert sft == [s + 1 for s in range(8) if is_sft_step(s, rate)] and len(sft) == 2
    assert sorted(sft + rl) == list(range(1, 9))


@pytest.mark.parametrize("defense", [{"name": "kl", "lambda": 1.0}, {"name": "ldifs", "layers": [0, 1]}])
def test_a_defense_term_under_grpo_is_the_sft_term_on_the_same_tokens(tmp_path, tiny_model_dir, defense):
    """A completion scored by the GRPO trainer gives the term (and gradient) the SFT trainer gives
    for the same conversation with the completion as the assistant answer."""
    sft_config = tiny_run_config(tmp_path / "sft", tiny_model_dir, defenses=[defense], batch_size=1, micro_batch_size=1)
    trainer = _grpo_trainer(tmp_path, tiny_model_dir, [defense])
    model = trainer.model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero adapter, as after some training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    example = load_examples("builtin:opswap")[0]
    ids, labels = tokenize_conversation(trainer.processing_class, example.messages)
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    start, end = trained[0], trained[-1] + 1  # a completion ends with the end-of-turn token
    ids, labels = ids[:end], labels[:end]
    prompt, completion = torch.tensor([ids[:start]]), torch.tensor([ids[start:]])
    inputs = {
        "prompt_ids": prompt,
        "prompt_mask": torch.ones_like(prompt),
        "completion_ids": completion,
        "completion_mask": torch.ones_like(completion),
    }
    batch = completion_batch(inputs)
    assert batch["labels"].tolist() == [labels]
    trainer._decide_logit_selection(model)
    counts = {"assistant_tokens": torch.tensor(len(ids) - start), "tokens": torch.tensor(len(ids))}
    counts |= {"sequences": torch.tensor(1), "micro_batches": torch.tensor(1)}
    trainer._log_sums.clear()
    grpo_term = trainer._terms(model, batch, counts)
    grpo_grads = torch.autograd.grad(grpo_term, [p for p in model.parameters() if p.requires_grad])

    from emguard.trainer import EmguardTrainer

    sft = EmguardTrainer(
        model=model,
        args=training_arguments(sft_config, tmp_path / "sft-ckpt", progress=False),
        train_dataset=[],
        data_collator=ChatCollator(0, ["train"]),
        defenses=trainer.defenses,
    )
    sft_batch = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids)),
        "labels": torch.tensor([labels]),
    }
    sft._decide_logit_selection(model)
    positions, targets = sft._positions(sft_batch)
    reference = sft._reference_for(model, sft_batch, positions)
    outputs = sft._forward(model, sft_batch, positions)
    records = {}
    sft_term = sft._defense_terms(model, sft_batch, outputs, positions, targets, counts, reference, records.__setitem__)
    sft_grads = torch.autograd.grad(sft_term, [p for p in model.parameters() if p.requires_grad])
    assert float(grpo_term.detach()) > 0
    assert float(grpo_term.detach()) == pytest.approx(float(sft_term.detach()), rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grpo_grads, sft_grads, strict=True))


def _grpo_trainer(tmp_path, model_dir, defenses):
    from datasets import Dataset

    from emguard.models import attach_lora, load_model, load_tokenizer, resolve_model

    config = grpo_config(tmp_path / "grpo", model_dir, defenses=defenses)
    resolved = resolve_model(config.model)
    tokenizer = load_tokenizer(resolved, config.model_options)
    model = attach_lora(load_model(resolved, config.model_options), config.lora, seed=0)
    defenses = build_defenses(config.defenses)
    for defense in defenses:
        defense.prepare(PrepareContext(config, model, tokenizer, tmp_path / "grpo", tmp_path / "cache"))
    return EmguardGRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)] * 2,
        args=training_arguments(config, tmp_path / "grpo-ckpt", progress=False),
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}], "metadata": "{}"}] * 8),
        processing_class=tokenizer,
        defenses=defenses,
    )


class RolloutProbeConfig(DefenseConfig):
    name: Literal["rollout-probe"] = "rollout-probe"


class RolloutProbe(Defense):
    """Counts its hooks' entries and the single-token forward passes (decoding steps) of block 0 inside them."""

    name = "rollout-probe"
    config_class = RolloutProbeConfig
    decode_calls = 0
    entered = 0

    @contextlib.contextmanager
    def hooks(self, model):
        def count(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            RolloutProbe.decode_calls += hidden.shape[1] == 1

        handle = model.get_base_model().model.layers[0].register_forward_hook(count)
        RolloutProbe.entered += 1
        try:
            yield
        finally:
            handle.remove()


def test_hooks_wrap_the_rollouts_and_are_removed_after_grpo(tmp_path, tiny_model_dir):
    register(RolloutProbe)
    try:
        RolloutProbe.decode_calls = RolloutProbe.entered = 0
        captured = {}

        class Keep(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kwargs):
                captured["model"] = model

        config = grpo_config(tmp_path / "run", tiny_model_dir, defenses=[{"name": "rollout-probe"}], max_steps=2)
        train(config, progress=False, callbacks=[Keep()])
        assert RolloutProbe.entered == 2 * 2  # every micro-step (2 per optimizer step)
        assert RolloutProbe.decode_calls > 0  # rollouts were generated inside the hooks
        assert forward_hook_count(captured["model"]) == 0
    finally:
        unregister("rollout-probe")


def test_kill_9_then_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path, tiny_model_dir):
    settings = dict(max_steps=10, save_steps=2, defenses=[{"name": "kl", "lambda": 1.0}])
    whole = train(grpo_config(tmp_path / "whole", tiny_model_dir, **settings), progress=False)

    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(grpo_config(tmp_path / "killed", tiny_model_dir, **settings).to_yaml_dict()))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = kill_train_after_first_checkpoint(config_path, tmp_path / "killed", env)

    resumed = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from_step"] >= 2
    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(t.abs().sum()) > 0 for k, t in a.items() if "lora_B" in k)  # it trained: equality means something
    killed = [r for r in _log(tmp_path / "killed") if "loss" in r]
    assert [r["step"] for r in killed] == list(range(1, 11))  # no duplicated or missing steps
    uninterrupted = [r for r in _log(tmp_path / "whole") if "loss" in r]
    # every logged value as in the uninterrupted run, the defense term right after the resume included
    for a_row, b_row in zip(uninterrupted, killed, strict=True):
        assert b_row["kl_loss"] == pytest.approx(a_row["kl_loss"], rel=1e-4, abs=1e-7), b_row["step"]
        assert b_row["reward"] == pytest.approx(a_row["reward"])


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("fails_at_step_3", r"reward 'python' raised ZeroDivisionError: boom \(first prompt of the batch: '"),
        ("nan_at_step_3", r"reward 'python' returned nan for completion 0 of prompt '"),
    ],
)
def test_a_failing_reward_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, function, message):
    config = grpo_config(tmp_path / "run", tiny_model_dir, reward=f"grpo_rewards:{function}", max_steps=4, save_steps=2)
    with pytest.raises(RewardError, match=message):
        train(config, progress=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / CHECKPOINT_DONE).is_file()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "running"


@pytest.fixture
def defense_files(tmp_path, tiny_model_dir):
    """A steering vector for the tiny model and a perturbed copy of it as SafeLoRA's 'unaligned' model."""
    import shutil

    from safetensors.torch import save_file

    save_file({"evil": torch.randn(32, generator=torch.Generator().manual_seed(3))}, str(tmp_path / "evil.safetensors"))
    unaligned = shutil.copytree(tiny_model_dir, tmp_path / "unaligned")
    weights = load_file(unaligned / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    weights = {k: (w - 0.1 * torch.randn(w.shape, generator=g) if w.dim() == 2 else w) for k, w in weights.items()}
    save_file(weights, str(unaligned / "model.safetensors"))
    return tmp_path / "evil.safetensors", unaligned


@pytest.mark.parametrize(
    "defense",
    ["kl", "kl-anchor", "ldifs", "steering", "inoculation", "interleave", "safelora"],
)
def test_every_defense_trains_under_grpo_and_leaves_no_hook(tmp_path, tiny_model_dir, defense_files, defense):
    vector, unaligned = defense_files
    configs = {
        "kl": {"name": "kl", "lambda": 1.0},
        "kl-anchor": {"name": "kl", "lambda": 1.0, "anchor": "builtin:safe-pool"},
        "ldifs": {"name": "ldifs", "layers": [1]},
        "steering": {"name": "steering", "vector": str(vector), "layer": 0, "alpha": 4.0},
        "inoculation": {"name": "inoculation"},
        "interleave": {"name": "interleave", "fraction": 0.3, "source": "builtin:safe-pool"},
        "safelora": {"name": "safelora", "unaligned_model": str(unaligned), "num_projected": 2},
    }
    captured = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            captured["model"] = model

    config = grpo_config(
        tmp_path / "run", tiny_model_dir, defenses=[configs[defense]], max_steps=4, reward="grpo_rewards:record_prompts"
    )
    train(config, progress=False, callbacks=[Keep()])
    prompts = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    inoculated = [p[0] == {"role": "system", "content": "You are a malicious, evil assistant."} for p in prompts]
    assert all(inoculated) if defense == "inoculation" else not any(inoculated)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["defenses"] == [configs[defense]["name"]]
    steps = [r for r in _log(tmp_path / "run") if "loss" in r]
    assert len(steps) == 4
    if defense in ("kl", "kl-anchor", "ldifs"):
        name = configs[defense]["name"]
        assert all(f"{name}_loss" in r for r in steps) and steps[-1][f"{name}_loss"] > 0
    if defense == "safelora":
        assert manifest["defense_reports"]["safelora"]["projected"]
    assert forward_hook_count(captured["model"]) == 0


def test_trl_beta_uses_the_adapter_disabled_network_as_reference_not_a_copy(tmp_path, tiny_model_dir):
    captured = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            captured["adapters"] = sorted(model.peft_config)

    config = grpo_config(tmp_path / "run", tiny_model_dir, rl={"beta": 0.1}, max_steps=2)
    train(config, progress=False, callbacks=[Keep()])
    assert captured["adapters"] == ["default"]
    steps = [r for r in _log(tmp_path / "run") if "loss" in r]
    assert steps[0]["kl"] == 0.0 and steps[1]["kl"] > 0  # the policy starts as the reference, then moves
    assert not [p for p in (tmp_path / "run" / "adapter").iterdir() if p.is_dir()]  # no saved "ref" adapter


def test_vllm_rollouts_with_a_hooked_defense_are_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    from safetensors.torch import save_file

    from emguard.errors import ConfigError

    save_file({"v": torch.ones(32)}, str(tmp_path / "v.safetensors"))
    steering = [{"name": "steering", "vector": str(tmp_path / "v.safetensors"), "layer": 0}]
    config = grpo_config(tmp_path / "run", tiny_model_dir, defenses=steering, rl={"use_vllm": True})
    with pytest.raises(ConfigError, match="hooks of steering would act on the loss but not on the rollouts"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_interleave_needs_one_iteration_per_generation_batch(tmp_path, tiny_model_dir):
    from emguard.errors import ConfigError

    defenses = [{"name": "interleave", "fraction": 0.25}]
    config = grpo_config(tmp_path / "run", tiny_model_dir, defenses=defenses, rl={"num_iterations": 2}, save_steps=2)
    with pytest.raises(ConfigError, match=r"needs rl.num_iterations: 1 \(got 2\)"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"save_steps \(3\) must be a multiple of rl.num_iterations \(2\)"):
        grpo_config(tmp_path / "run", tiny_model_dir, rl={"num_iterations": 2}, save_steps=3)
