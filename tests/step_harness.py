"""Drive single training micro-steps of the real trainer on a tiny model, to inspect loss terms and gradients."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import tiny_run_config
from emguard.data.collate import ChatCollator
from emguard.data.sources import load_examples
from emguard.data.tokenize import tokenize_examples
from emguard.defenses.base import PrepareContext
from emguard.defenses.registry import build_defenses
from emguard.models import attach_lora, cache_root, load_model, load_tokenizer, resolve_model
from emguard.trainer import EmguardTrainer
from emguard.training import training_arguments


class Harness:
    """A tiny PEFT model, its trainer with ``defenses``, and one fixed batch."""

    def __init__(self, tmp_path: Path, model_dir: Path, defenses: list[dict], batch_size: int = 4, **training):
        self.config = tiny_run_config(
            tmp_path / "run",
            model_dir,
            defenses=defenses,
            batch_size=batch_size,
            micro_batch_size=batch_size,
            **training,
        )
        self.config.data.max_length = 512  # the tiny tokenizer spends many tokens on safe-pool text
        resolved = resolve_model(self.config.model)
        self.tokenizer = load_tokenizer(resolved, self.config.model_options)
        self.model = attach_lora(load_model(resolved, self.config.model_options), self.config.lora, seed=0)
        self.defenses = build_defenses(self.config.defenses)
        examples = load_examples(self.config.data.train)[:batch_size]
        ctx = PrepareContext(self.config, self.model, self.tokenizer, tmp_path / "run", cache_root())
        for d in self.defenses:
            d.prepare(ctx)
            examples = d.transform_dataset(examples)
        tokenized = tokenize_examples(self.tokenizer, examples, max_length=512)
        tags = sorted({t.tag for t in tokenized})
        self.batch = ChatCollator(self.tokenizer.pad_token_id, tags)(tokenized[:batch_size])
        self.trainer = EmguardTrainer(
            model=self.model,
            args=training_arguments(self.config, tmp_path / "ckpt", progress=False),
            train_dataset=tokenized,
            data_collator=ChatCollator(self.tokenizer.pad_token_id, tags),
            defenses=self.defenses,
            tags=tags,
        )

    def lora_params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def perturb_lora(self, scale: float = 0.05, seed: int = 1) -> None:
        """Make the adapter non-zero (as after some training)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.lora_params().values():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)

    def step(self, micro_batches: int = 1) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """One optimizer step's forward+backward passes, the batch repeated as ``micro_batches``
        accumulated micro-batches: (logged terms, gradients of the LoRA parameters)."""
        self.model.zero_grad(set_to_none=True)
        self.trainer._counts = self.trainer._gather_counts([self.batch] * micro_batches, torch.device("cpu"))
        self.trainer._log_sums.clear()
        for _ in range(micro_batches):
            self.trainer.training_step(self.model, dict(self.batch))
        logs = dict(self.trainer._log_sums)
        grads = {n: p.grad.detach().clone() for n, p in self.lora_params().items() if p.grad is not None}
        return logs, grads
