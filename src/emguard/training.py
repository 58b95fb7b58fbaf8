"""``emguard train``: fine-tune a LoRA adapter with the configured defenses into a run directory.

The order matters for "bad input never loses data": everything that can fail on user input
(config, data, model, tokenisation, defense preparation) runs before the run directory is touched.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback, TrainingArguments, set_seed

from emguard.callbacks import CheckpointMarkerCallback, ProgressBarCallback, TrainLogCallback
from emguard.config import RunConfig
from emguard.data.chat import examples_fingerprint
from emguard.data.chat_template import system_prompt_handling
from emguard.data.collate import ChatCollator
from emguard.data.sources import load_examples
from emguard.data.tokenize import TokenizedExample, tokenize_examples
from emguard.defenses.base import PrepareContext
from emguard.defenses.registry import build_defenses
from emguard.distributed import (
    broadcast,
    check_launch,
    is_main_process,
    main_process_first,
    num_processes,
    shards_parameters,
    wait_for_everyone,
)
from emguard.errors import ConfigError
from emguard.evaluation.generation import stop_token_ids
from emguard.fsio import atomic_directory
from emguard.grpo import (
    check_rl_defenses,
    describe_rewards,
    grpo_arguments,
    load_rl_prompts,
    reward_functions,
    rl_data,
)
from emguard.models import (
    attach_lora,
    cache_root,
    load_model,
    load_tokenizer,
    model_identity,
    resolve_dtype,
    resolve_model,
)
from emguard.monitor import EMMonitorCallback
from emguard.rundir import ADAPTER, CHECKPOINTS, TRAIN_LOG, RunDir, git_commit, now, package_versions
from emguard.trainer import EmguardTrainer
from emguard.utils import sha256_file, sha256_text

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or already finished) training run produced."""

    run_dir: Path
    adapter_dir: Path
    steps: int
    first_loss: float | None
    final_loss: float | None
    runtime_s: float
    skipped: bool = False  # the run directory already held this finished run
    resumed_from_step: int | None = None
    first_reward: float | None = None  # GRPO: the mean reward of the first and the last logged step
    final_reward: float | None = None

    def summary(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def train(
    config: RunConfig,
    *,
    resume: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train ``config`` into ``config.output_dir``.

    Args:
        config: The resolved run configuration.
        resume: ``None`` resumes from the last complete checkpoint of an interrupted run of the same
            config if there is one; ``True`` does the same and says so; ``False`` starts over.
        overwrite: Replace a run directory that holds a different or finished run.
        progress: Show a progress bar.
        callbacks: Extra ``TrainerCallback``s (e.g. monitors).

    Raises:
        ConfigError / DataError / EmguardError: Bad input; nothing is written in that case.
    """
    started = time.monotonic()
    check_launch()  # several GPUs in one process: a clear error, never DataParallel
    run = RunDir(config.output_dir)
    state = "new" if overwrite and run.manifest() is not None else run.check_reusable(config)
    if state == "finished":
        return _finished_result(run, skipped=True)

    # 1. Everything that can fail on bad input, before any write. Under a launcher every process
    #    does this; the main process goes first where a shared cache is filled.
    grpo = config.training.method == "grpo"
    if not grpo and config.data is None:
        raise ConfigError("data.train is required to train (a chat JSONL path or builtin:NAME)")
    args = training_arguments(config, run.path / CHECKPOINTS, progress)  # starts the process group, if any
    set_seed(config.training.seed)
    defenses = build_defenses(config.defenses)
    if grpo:
        check_rl_defenses(config, defenses)
    examples = load_rl_prompts(config) if grpo else _load_training_examples(config)
    with main_process_first():  # the built-in model is converted once, by one process
        resolved = resolve_model(config.model)
    tokenizer = load_tokenizer(resolved, config.model_options)
    model = load_model(resolved, config.model_options, device=None)
    model = attach_lora(model, config.lora, seed=config.training.seed)
    if not shards_parameters():  # where the Trainer would put it; Interleaving++ scores its pool there
        model.to(args.device)
    if config.training.gradient_checkpointing:
        model.enable_input_require_grads()
    prepare = PrepareContext(config, model, tokenizer, run.path, cache_root(), progress=progress)
    with main_process_first():  # e.g. Interleaving++ scores the pool once; the others read its cache
        for defense in defenses:
            defense.prepare(prepare)
            examples = defense.transform_dataset(examples)
    examples = broadcast(examples)  # every process trains on the main process's data, whatever rounding did
    if grpo:
        rl = rl_data(config, tokenizer, examples)
        rewards, reward_funcs = reward_functions(config, run.path, cache_root())
        tokenized = rl.sft
    else:
        tokenized = tokenize_examples(
            tokenizer, examples, max_length=config.data.max_length, overlong=config.data.overlong
        )
    monitor = None
    if config.monitor.every:
        monitor = EMMonitorCallback(config, tokenizer, model_identity(resolved, config.model_options))
    checkpoint = run.latest_checkpoint() if state == "interrupted" and resume is not False else None
    wait_for_everyone()  # every process has read the run directory before the main process writes it

    # 2. The run directory (main process only): config first, then the manifest.
    main = is_main_process()
    if main:
        if overwrite:
            run.clear()
        if resume and checkpoint is None:
            log.warning("--resume: %s holds no complete checkpoint of this run; starting from step 0", run.path)
        if checkpoint is None:
            run.remove_checkpoints()
            run.truncate_train_log(-1)
        else:
            run.truncate_train_log(int(checkpoint.name.split("-")[-1]))
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(config)
        manifest = run.manifest() if checkpoint else None
        if manifest is None:
            data = _rl_manifest(config, rl, rewards) if grpo else _sft_manifest(config, examples, tokenized)
            manifest = _new_manifest(config, resolved, tokenizer, data, defenses)
        manifest.update(status="running", resumed_from_step=_step_of(checkpoint))
        run.write_manifest(manifest)
    wait_for_everyone()

    # 3. Train (every process).
    tags = sorted({ex.tag for ex in tokenized}, key=lambda t: (t != "train", t))
    collator = ChatCollator(tokenizer.pad_token_id, tags, pad_to_multiple_of=8)
    run_callbacks = [TrainLogCallback(run / TRAIN_LOG), CheckpointMarkerCallback(), *callbacks]
    if grpo:
        from datasets import Dataset

        from emguard.grpo_trainer import EmguardGRPOTrainer

        # Completions end where the template ends a turn, not only at EOS (as in evaluation).
        model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config)
        trainer = EmguardGRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=Dataset.from_list(rl.rows),
            processing_class=tokenizer,
            defenses=defenses,
            sft_examples=rl.sft,
            sft_collator=collator,
            sft_rate=rl.sft_rate,
            callbacks=run_callbacks,
        )
    else:
        trainer = EmguardTrainer(
            model=model,
            args=args,
            train_dataset=tokenized,
            data_collator=collator,
            processing_class=tokenizer,
            defenses=defenses,
            tags=tags,
            callbacks=run_callbacks,
        )
    if monitor is not None:
        trainer.add_callback(monitor.bind(trainer))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(ProgressBarCallback(f"training {Path(*run.path.parts[-3:])}"))
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # 4. Post-hoc edits (every process), then the adapter (atomically) and the finished manifest.
    for defense in defenses:
        defense.finalize(model)
    # Every process takes part: under FSDP or DeepSpeed ZeRO-3 this gathers the sharded weights.
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if main:
        model.peft_config["default"].base_model_name_or_path = config.model
        with atomic_directory(run / ADAPTER) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
        log_records = run.read_train_log()
        losses = [r["loss"] for r in log_records if "loss" in r]
        rewards = [r["reward"] for r in log_records if "reward" in r]
        train_runtime = output.metrics.get("train_runtime", 0.0)
        run.update_manifest(
            monitor=monitor.summary(train_runtime) if monitor is not None else None,
            defense_reports={d.name: d.report for d in defenses if d.report is not None},
            status="finished",
            finished_at=now(),
            processes=num_processes(),
            train={
                "steps": trainer.state.global_step,
                "first_loss": losses[0] if losses else None,
                "final_loss": losses[-1] if losses else None,
                **({"first_reward": rewards[0], "final_reward": rewards[-1]} if rewards else {}),
                "train_runtime_s": round(train_runtime, 2),
                "wall_time_s": round(time.monotonic() - started, 2),
            },
        )
        if not config.training.keep_checkpoints:
            run.remove_checkpoints()
    wait_for_everyone()  # no process returns before the adapter and manifest are in place
    result = _finished_result(run, skipped=False)
    result.resumed_from_step = _step_of(checkpoint)
    return result


def _step_of(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name.split("-")[-1]) if checkpoint else None


def _load_training_examples(config: RunConfig) -> list:
    examples = load_examples(config.data.train, seed=config.training.seed, unique=config.data.unique)
    n = config.data.max_examples
    if n is not None and n < len(examples):
        keep = sorted(random.Random(config.training.seed).sample(range(len(examples)), n))
        examples = [examples[i] for i in keep]
    return examples


def training_arguments(config: RunConfig, output_dir: Path, progress: bool = True) -> TrainingArguments:
    """Map the run config onto ``TrainingArguments`` (the Trainer's knobs live here, nowhere else)."""
    t = config.training
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = t.micro_batch_size * world_size
    if t.batch_size % per_step:
        raise ConfigError(
            f"training.batch_size={t.batch_size} is not a multiple of micro_batch_size × processes "
            f"({t.micro_batch_size} × {world_size}); change one of them"
        )
    dtype = resolve_dtype(config.model_options.dtype)
    common = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.batch_size // per_step,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm or 0.0,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        train_sampling_strategy=t.sampling,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,  # the newest complete checkpoint survives a kill during the next save
        report_to=t.report_to or "none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # emguard's own bar (ProgressBarCallback) replaces the Trainer's
    )
    args = grpo_arguments(config, common) if t.method == "grpo" else TrainingArguments(**common)
    _ = args.device  # sets up the device now and, under a launcher, the process group (emguard.distributed)
    return args


def _new_manifest(config, resolved, tokenizer, data: dict, defenses) -> dict:
    return {
        "command": "train",
        "created_at": now(),
        "status": "running",
        "config_hash": config.fingerprint(),
        "emguard_git": git_commit(),
        "versions": package_versions(),
        "device": _device_description(),
        "seed": config.training.seed,
        "model": {
            "spec": resolved.spec,
            "kind": resolved.kind,
            "location": resolved.location,
            "sha256": resolved.sha256,
            "revision": config.model_options.revision,
        },
        "chat_template_sha256": sha256_text(tokenizer.chat_template or ""),
        "system_prompts": system_prompt_handling(tokenizer),  # or folded into the first user turn
        "data": data,
        "defenses": [d.name for d in defenses],
        "judge_model": None,
    }


def _sft_manifest(config: RunConfig, examples: list, tokenized: list[TokenizedExample]) -> dict:
    data_spec = config.data.train
    tags: dict[str, int] = {}
    for ex in tokenized:
        tags[ex.tag] = tags.get(ex.tag, 0) + 1
    return {
        "train": {
            "spec": data_spec,
            "file_sha256": None if data_spec.startswith("builtin:") else sha256_file(Path(data_spec)),
            "examples": len(examples),
            "examples_sha256": examples_fingerprint(examples),
        },
        "tokenized": {
            "examples_by_tag": tags,
            "trained_tokens": sum(ex.num_trained for ex in tokenized),
            "tokens": sum(len(ex.input_ids) for ex in tokenized),
        },
    }


def _rl_manifest(config: RunConfig, rl: Any, rewards: Sequence[Any]) -> dict:
    spec = config.rl.prompts
    return {
        "method": "grpo",
        "prompts": {
            "spec": spec,
            "file_sha256": None if spec.startswith("builtin:") else sha256_file(Path(spec)),
            "prompts": len(rl.prompts),
            "examples_sha256": examples_fingerprint(rl.prompts),
        },
        "sft_steps_data": {"examples": len(rl.sft), "rate": round(rl.sft_rate, 6)},
        "rewards": describe_rewards(rewards),
    }


def _device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _finished_result(run: RunDir, skipped: bool) -> TrainResult:
    manifest = run.manifest() or {}
    info = manifest.get("train", {})
    return TrainResult(
        run_dir=run.path,
        adapter_dir=run / ADAPTER,
        steps=info.get("steps", 0),
        first_loss=info.get("first_loss"),
        final_loss=info.get("final_loss"),
        runtime_s=info.get("wall_time_s", 0.0),
        skipped=skipped,
        first_reward=info.get("first_reward"),
        final_reward=info.get("final_reward"),
    )
