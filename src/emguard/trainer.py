"""The trainer: a ``transformers.Trainer`` whose loss is ``L_SFT + Σ_d weight_d · term_d``.

It knows the defense interface, never a particular defense. Being a ``Trainer``, it runs unchanged
under ``accelerate launch`` (DDP, FSDP, DeepSpeed) and reports to the Trainer's integrations.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer

from emguard.defense_passes import DefensePassesMixin, chat_batch_counts
from emguard.defenses.base import Defense
from emguard.losses import IGNORE_INDEX, token_nll


class EmguardTrainer(DefensePassesMixin, Trainer):
    """SFT with the configured defenses.

    Per optimizer step it (1) counts the tokens of the whole accumulated batch; per micro-batch it
    (2) picks the positions that need logits and, inside every defense's ``hooks``, (3) runs the
    adapter-disabled reference forward pass if a defense needs it (eval mode, no grad) and (4) the
    forward pass (output head only at those positions), the SFT loss, the defense terms, and
    backward.
    """

    # compute_loss normalises by counts over the whole accumulated batch, so Trainer must not
    # divide again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, defenses: Sequence[Defense] = (), tags: Sequence[str] = ("train",), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_defenses(defenses)
        self.tags = tuple(tags)
        self._counts: dict[str, torch.Tensor] | None = None
        self._step_inputs: dict[str, Any] = {}
        self._log_sums: dict[str, float] = defaultdict(float)  # per-step values, summed until logged
        self._tag_sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # tag -> [nll sum, tokens]
        self._last_logged_step: int | None = None  # set on the first step (a resumed run starts later)

    # (1) counts over the accumulated batch -------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches:
            self._counts = self._gather_counts(batches, device)
        return batches, num_items

    def _gather_counts(self, batches: list[dict], device: Any) -> dict[str, torch.Tensor]:
        return self._global_counts(chat_batch_counts(batches), device)

    # (2)-(4) one micro-batch ---------------------------------------------------------------
    def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        if self._last_logged_step is None:
            self._last_logged_step = self.state.global_step
        inputs = self._prepare_inputs(inputs)
        self._decide_logit_selection(model)
        positions, targets = self._positions(inputs)
        try:
            # The hooks wrap the reference pass too: a regulariser must compare the trained and the
            # original network under the same interventions (e.g. steering), or it trains the adapter
            # to undo them.
            with self._defense_hooks():
                reference = self._reference_for(model, inputs, positions)
                self._step_inputs = {"positions": positions, "targets": targets, "reference": reference}
                return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._step_inputs = {}

    def compute_loss(
        self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if self._step_inputs:
            positions, targets = self._step_inputs["positions"], self._step_inputs["targets"]
        else:  # evaluation / prediction_step
            positions, targets = self._positions(inputs)
        counts = (
            self._counts
            if model.training and self._counts is not None
            else self._gather_counts([inputs], inputs["input_ids"].device)
        )
        outputs = self._forward(model, inputs, positions)
        nll = token_nll(outputs.logits, targets)
        sft = nll.sum() / counts["assistant_tokens"]
        self._record("sft_loss", sft)
        self._record_tags(nll, positions, targets, inputs.get("tag_ids"))
        reference = self._step_inputs.get("reference")
        total = sft + self._defense_terms(model, inputs, outputs, positions, targets, counts, reference, self._record)
        if self.accelerator.num_processes > 1:
            # DDP averages gradients over processes; the counts are already global, so undo the average.
            total = total * self.accelerator.num_processes
        return (total, outputs) if return_outputs else total

    # logging ----------------------------------------------------------------------------------
    def _record(self, key: str, value: torch.Tensor | float) -> None:
        if self.model.training:
            self._log_sums[key] += float(value.detach()) if torch.is_tensor(value) else float(value)

    def _record_tags(
        self, nll: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, tag_ids: torch.Tensor | None
    ) -> None:
        if tag_ids is None or len(self.tags) < 2 or not self.model.training:
            return
        row_tags = tag_ids[positions.nonzero()[:, 0]]
        trained = targets != IGNORE_INDEX
        for i, tag in enumerate(self.tags):
            sel = (row_tags == i) & trained
            self._tag_sums[tag][0] += float(nll[sel].detach().sum())
            self._tag_sums[tag][1] += float(sel.sum())

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: add each term, averaged over the steps since the last one
            logs.update(self._pop_term_logs())
        super().log(logs, *args, **kwargs)

    def _pop_term_logs(self) -> dict[str, float]:
        steps = max(self.state.global_step - (self._last_logged_step or 0), 1)
        self._last_logged_step = self.state.global_step
        keys = sorted(self._log_sums)
        tag_keys = [t for t in self.tags if len(self.tags) > 1]
        values = [self._log_sums[k] for k in keys] + [x for t in tag_keys for x in self._tag_sums[t]]
        self._log_sums.clear()
        self._tag_sums.clear()
        if self.accelerator.num_processes > 1:  # every process holds its share of the global sums
            values = self.accelerator.reduce(torch.tensor(values, device=self.args.device), "sum").tolist()
        logs = {k: round(v / steps, 6) for k, v in zip(keys, values, strict=False)}
        tag_values = values[len(keys) :]
        for i, tag in enumerate(tag_keys):
            total, count = tag_values[2 * i], tag_values[2 * i + 1]
            if count:
                logs[f"sft_loss/{tag}"] = round(total / count, 6)
        return logs
