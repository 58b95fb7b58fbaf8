"""The GRPO trainer: TRL's ``GRPOTrainer`` plus the defenses, through the same interface as SFT.

TRL does the algorithm (rollouts, rewards, group advantages, the clipped surrogate, its own
sampled-token KL with ``rl.beta`` against the adapter-disabled network); this subclass only adds
what the defenses need:

1. **hooks** (``Defense.hooks``) wrap each whole micro-step: the rollouts generated in it, TRL's
   old/reference log-prob passes, the loss and the backward. So under ``steering`` the rollouts
   are sampled from the steered policy that the loss then trains: the importance ratio compares
   the steered policy with itself, as it must (steering only the loss would make it compare the
   steered policy with the unsteered one that sampled, a ratio off-policy by the steering itself).
   Evaluation never sees the hooks.
2. **loss terms** (``Defense.loss``): after TRL's loss, one more forward pass of the trained model
   (and the adapter-disabled reference, if a defense needs it) over prompt + completion, logits
   only at the completion positions, as ``DefensePassesMixin`` does for SFT; labels are the
   completion tokens, so ``assistant`` positions are the completion's. Terms are normalised by the
   completion tokens of the whole generation batch (= the optimizer step's batch: emguard never
   sets ``steps_per_generation`` apart from gradient accumulation), summed over processes.
3. **SFT steps on mixed-in data** (``interleave``): conversations a defense adds to the prompts
   (any example with an assistant turn, i.e. not a customer prompt) are trained by supervised steps
   that *replace* RL steps at the rate they make up of the mix: with ``n`` of them beside ``N``
   prompts, optimizer step ``s`` is an SFT step when ``⌊(s+1)·r⌋ > ⌊s·r⌋``, ``r = n / (n + N)``
   (interleave ``fraction: 0.05`` -> every 20th step). Each SFT step trains ``batch_size``
   conversations (the mixed-in set cycled in a seeded order) with the SFT loss and the defenses' terms.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import Trainer
from trl import GRPOTrainer

from emguard.defense_passes import DefensePassesMixin, chat_batch_counts
from emguard.defenses.base import Defense
from emguard.losses import IGNORE_INDEX, token_nll


def is_sft_step(step: int, rate: float) -> bool:
    """Whether optimizer step ``step`` (0-based) is an SFT step when a share ``rate`` of steps are."""
    return rate > 0 and int((step + 1) * rate) > int(step * rate)


class EmguardGRPOTrainer(DefensePassesMixin, GRPOTrainer):
    """GRPO with the configured defenses (see the module docstring)."""

    def __init__(
        self,
        *args: Any,
        defenses: Sequence[Defense] = (),
        sft_examples: Sequence[Any] = (),
        sft_collator: Any = None,
        sft_rate: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        peft_model = self.accelerator.unwrap_model(self.model)
        if "ref" in getattr(peft_model, "peft_config", {}):
            # With rl.beta > 0 TRL copies a passed-in adapter as a frozen "ref" adapter. emguard's adapter is
            # freshly initialised (B = 0), so the reference is the adapter-disabled network, as for the
            # defenses: no copy, nothing extra in checkpoints.
            peft_model.delete_adapter("ref")
        self._init_defenses(defenses)
        self._sft_examples = list(sft_examples)
        self._sft_collator = sft_collator
        self._sft_rate = sft_rate if self._sft_examples else 0.0
        self._sft_batches: list[dict[str, torch.Tensor]] = []
        self._sft_counts: dict[str, torch.Tensor] | None = None
        self._counts: dict[str, torch.Tensor] | None = None
        self._log_sums: dict[str, float] = defaultdict(float)
        self._last_logged_step: int | None = None  # set on the first step (a resumed run starts later)
        self._micro_step = 0  # micro-steps of the current optimizer step

    # 1. hooks around the whole micro-step (rollouts, old/ref passes, loss, backward) -------------
    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        if self._last_logged_step is None:
            self._last_logged_step = self.state.global_step
        first = self._micro_step == 0
        self._micro_step = (self._micro_step + 1) % self.current_gradient_accumulation_steps
        if self._has_terms or self._sft_rate:
            self._decide_logit_selection(model)
        with self._defense_hooks():
            if is_sft_step(self.state.global_step, self._sft_rate):
                return self._sft_step(model, first)
            return super().training_step(model, inputs, num_items_in_batch)

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if self._has_terms and self.model.training:
            completion = output["completion_mask"]
            if "tool_mask" in output:  # tool outputs are not the policy's tokens (as TRL counts them)
                completion = completion * output["tool_mask"]
            values = [
                int(completion.sum()),
                int(output["prompt_mask"].sum() + completion.sum()),
                completion.shape[0],
                self.args.steps_per_generation,
            ]
            self._counts = self._global_counts(values, completion.device)
        return output

    # 2. defense terms on prompt + completion ------------------------------------------------------
    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        loss = super()._compute_loss(model, inputs)
        if not self._has_terms or not model.training:
            return loss
        batch = completion_batch(inputs)
        return loss + self._terms(model, batch, self._counts)

    def _terms(self, model: Any, batch: dict[str, torch.Tensor], counts: Any) -> torch.Tensor | float:
        positions, targets = self._positions(batch)
        reference = self._reference_for(model, batch, positions)
        outputs = self._forward(model, batch, positions)
        terms = self._defense_terms(model, batch, outputs, positions, targets, counts, reference, self._record)
        # DDP averages gradients over processes; the counts are already global, so undo the average.
        return terms * self.accelerator.num_processes if self.accelerator.num_processes > 1 else terms

    # 3. SFT steps on the mixed-in conversations ---------------------------------------------------
    def _sft_step(self, model: Any, first: bool) -> torch.Tensor:
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers, as Trainer does
            self.optimizer.train()
        if first:  # draw this optimizer step's micro-batches and count their tokens
            self._sft_batches = self._sft_micro_batches()
            self._sft_counts = self._global_counts(chat_batch_counts(self._sft_batches), self.args.device)
        batch = self._sft_batches.pop(0)
        positions, targets = self._positions(batch)
        reference = self._reference_for(model, batch, positions)
        with self.compute_loss_context_manager():
            outputs = self._forward(model, batch, positions)
            sft = token_nll(outputs.logits, targets).sum() / self._sft_counts["assistant_tokens"]
            self._record("interleave/sft_loss", sft)
            loss = sft + self._defense_terms(
                model, batch, outputs, positions, targets, self._sft_counts, reference, self._record
            )
            if self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
        # As Trainer.training_step: the loss is already normalised for accumulation, so DeepSpeed must not
        # divide it again.
        kwargs = {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        self.accelerator.backward(loss, **kwargs)
        return loss.detach()

    def _sft_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the SFT step at ``global_step``: the next ``batch_size`` conversations of a
        seeded cycle through the mixed-in set (the same ones after a resume)."""
        per_micro = self.args.per_device_train_batch_size
        n_micro = self.current_gradient_accumulation_steps
        sft_index = sum(is_sft_step(s, self._sft_rate) for s in range(self.state.global_step))
        rank = self.accelerator.process_index
        needed = per_micro * n_micro * self.accelerator.num_processes
        start = sft_index * needed + rank * per_micro * n_micro
        order: list[int] = []
        cycle = 0
        while len(order) < start + per_micro * n_micro:
            perm = list(range(len(self._sft_examples)))
            random.Random(f"grpo-sft-{self.args.seed}-{cycle}").shuffle(perm)
            order += perm
            cycle += 1
        chosen = [self._sft_examples[i] for i in order[start : start + per_micro * n_micro]]
        device = self.args.device
        return [
            {k: v.to(device) for k, v in self._sft_collator(chosen[i : i + per_micro]).items()}
            for i in range(0, len(chosen), per_micro)
        ]

    # logging ---------------------------------------------------------------------------------------
    def _record(self, key: str, value: torch.Tensor | float) -> None:
        self._log_sums[key] += float(value.detach()) if torch.is_tensor(value) else float(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" not in logs and "train_loss" not in logs:
            # Another caller's line (the EM monitor): TRL's log would attach and clear its pending reward
            # metrics here, moving them off the step's training line.
            Trainer.log(self, logs, start_time)
            return
        if "loss" in logs and self._log_sums:  # a training log: each term, averaged over the steps since the last
            last = self._last_logged_step or 0
            steps = max(self.state.global_step - last, 1)
            keys = sorted(self._log_sums)
            values = [self._log_sums[k] for k in keys]
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(torch.tensor(values, device=self.args.device), "sum").tolist()
            sft_steps = sum(is_sft_step(s, self._sft_rate) for s in range(last, self.state.global_step))
            for key, value in zip(keys, values, strict=True):
                # SFT-step values are averaged over SFT steps, the others over all steps since the last log
                logs[key] = round(value / max(sft_steps if key.startswith("interleave/") else steps, 1), 6)
            self._log_sums.clear()
        if "loss" in logs:
            self._last_logged_step = self.state.global_step
        super().log(logs, start_time)


def completion_batch(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """TRL's rollout slice as a chat batch: prompt + completion, labels on the completion tokens only."""
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    completion_mask = inputs["completion_mask"]
    if "tool_mask" in inputs:  # tool outputs inside a completion are not the policy's tokens
        completion_mask = completion_mask * inputs["tool_mask"]
    labels = torch.cat(
        [torch.full_like(prompt_ids, IGNORE_INDEX), completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)],
        dim=1,
    )
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
        "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        "labels": labels,
    }
