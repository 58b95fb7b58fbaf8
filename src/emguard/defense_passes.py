"""What both trainers (SFT and GRPO) do for the defenses, in one place.

A mixin for a ``transformers.Trainer`` subclass: the defenses' hooks around a training micro-step,
the forward pass with logits only where a loss needs them (and the captured block outputs), the
adapter-disabled reference pass, and the sum ``Σ_d weight_d · term_d`` of the defenses' loss
terms. The trainers differ only in the loss the terms are added to and in how they count tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from emguard.blocks import capture_block_outputs, decoder_blocks
from emguard.defenses.base import Defense, StepContext
from emguard.logits import logits_at, output_head, selection_is_exact
from emguard.losses import IGNORE_INDEX, next_token_targets

log = logging.getLogger(__name__)

COUNT_NAMES = ("assistant_tokens", "tokens", "sequences", "micro_batches")


def chat_batch_counts(batches: Sequence[Mapping[str, torch.Tensor]]) -> list[int]:
    """``COUNT_NAMES`` of this process's chat micro-batches (labels, attention masks)."""
    return [
        sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
        sum(int(b["attention_mask"].sum()) for b in batches),
        sum(b["input_ids"].shape[0] for b in batches),
        len(batches),
    ]


class DefensePassesMixin:
    """Needs ``self.model``, ``self.accelerator`` and ``self.state`` (a Trainer's)."""

    def _init_defenses(self, defenses: Sequence[Defense]) -> None:
        self.defenses = list(defenses)
        self._needs_reference = any(d.needs_reference for d in self.defenses)
        self._reference_logits = any(d.needs_reference and d.needs_reference_logits for d in self.defenses)
        self._feature_layers = sorted({layer for d in self.defenses for layer in d.feature_layers})
        self._blocks = decoder_blocks(self.model) if self._feature_layers else None
        self._all_positions = any(d.logit_positions == "all" for d in self.defenses)
        self._has_terms = any(d.has_loss for d in self.defenses)
        self._select_logits: bool | None = None  # decided once, on the first step

    @property
    def _peft_model(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def _global_counts(self, values: list[int], device: Any) -> dict[str, torch.Tensor]:
        """``COUNT_NAMES`` summed over processes (each at least 1): what the terms are normalised by."""
        counts = torch.tensor(values, device=device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts.unsqueeze(0)).sum(0)
        return {n: c.clamp(min=1) for n, c in zip(COUNT_NAMES, counts, strict=True)}

    def _decide_logit_selection(self, model: Any) -> None:
        if self._select_logits is None:
            self._select_logits = selection_is_exact(model, output_head(self._peft_model))
            if not self._select_logits:
                log.warning(
                    "%s: the output head cannot be restricted to selected positions; computing full logits",
                    type(self._peft_model.get_base_model()).__name__,
                )

    @contextlib.contextmanager
    def _defense_hooks(self) -> Iterator[None]:
        """Every defense's ``hooks`` for one micro-step; all removed on exit, also on exceptions."""
        with contextlib.ExitStack() as stack:
            for defense in self.defenses:
                stack.enter_context(defense.hooks(self._peft_model))
            yield

    def _positions(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Where logits are needed (``[batch, seq]`` bool) and the next token each of those rows predicts."""
        targets = next_token_targets(inputs["labels"])
        positions = inputs["attention_mask"].bool() if self._all_positions else targets != IGNORE_INDEX
        return positions, targets[positions]

    def _forward(self, model: Any, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor) -> Any:
        """Forward pass; ``outputs.logits`` holds rows at ``positions`` only, ``outputs.features`` the
        captured block outputs (``{layer: [batch, seq, hidden]}``)."""
        capture = capture_block_outputs(self._blocks, self._feature_layers)  # no layers: no hooks, {}
        with logits_at(output_head(self._peft_model), positions if self._select_logits else None), capture as features:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        if not self._select_logits:
            outputs["logits"] = outputs.logits[positions]
        outputs["features"] = dict(features)
        return outputs

    def _reference_forward(self, model: Any, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor) -> Any:
        """The original model: same weights, LoRA disabled, eval mode (no dropout), no grad; the defenses'
        hooks (e.g. steering) apply as they do to the trained pass."""
        peft_model = self._peft_model
        if not hasattr(peft_model, "disable_adapter"):
            raise RuntimeError(
                "a defense needs the reference model, which emguard takes from the LoRA-disabled network"
            )
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), peft_model.disable_adapter():
                return self._forward(model, inputs, positions)
        finally:
            model.train(was_training)

    def _reference_for(self, model: Any, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor) -> Any:
        """The reference pass the defenses need on this batch (None when none needs it)."""
        if not self._needs_reference:
            return None
        ref_positions = positions if self._reference_logits else torch.zeros_like(positions)
        return self._reference_forward(model, inputs, ref_positions)

    def _defense_terms(
        self,
        model: Any,
        inputs: Mapping[str, torch.Tensor],
        outputs: Any,
        positions: torch.Tensor,
        targets: torch.Tensor,
        counts: Mapping[str, torch.Tensor],
        reference: Any,
        record: Callable[[str, Any], None],
    ) -> torch.Tensor | float:
        """``Σ_d weight_d · term_d`` over the defenses with a loss; each term and log goes to ``record``."""
        ctx = StepContext(
            model=self._peft_model,
            step=self.state.global_step,
            counts=counts,
            positions=positions,
            targets=targets,
            reference=reference,
            forward=lambda batch, pos, reference=False: (
                self._reference_forward(model, batch, pos) if reference else self._forward(model, batch, pos)
            ),
        )
        total: torch.Tensor | float = 0.0
        for defense in self.defenses:
            if not defense.has_loss:
                continue
            term, logs = defense.loss(inputs, outputs, ctx)
            total = total + defense.weight * term
            record(f"{defense.name}_loss", term)
            for key, value in logs.items():
                record(f"{defense.name}/{key}", value)
        return total
