"""The defense interface: every hook is optional and a no-op by default.

A defense is built from its config section and may implement:

- ``prepare(ctx)``: one-off work before training (load a vector, select data);
- ``transform_dataset(examples)``: change the training conversations (before tokenisation);
- ``hooks(model)``: a context manager around each training micro-step: the reference pass, the
  forward *and* the backward (backward too, so activation recomputation under gradient
  checkpointing sees the same hooks; the reference pass too, so a regulariser compares the trained
  and the original network under the same interventions); it must remove what it installs, also on
  exceptions;
- ``loss(batch, outputs, ctx)``: an extra term, normalised as the SFT loss is (see StepContext);
- ``finalize(model)``: post-hoc weight edits after training, before the adapter is saved.

The trainer adds ``weight * term`` for every defense with a ``loss`` and never names a defense.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from emguard.config import DefenseConfig

if TYPE_CHECKING:
    from emguard.config import RunConfig
    from emguard.data.chat import ChatExample


@dataclass
class PrepareContext:
    """What ``Defense.prepare`` may use."""

    config: RunConfig
    model: Any  # the PEFT model being trained
    tokenizer: Any
    run_dir: Path
    cache_dir: Path
    progress: bool = False  # show progress bars for long preparation (e.g. scoring a pool)


@dataclass
class StepContext:
    """What ``Defense.loss`` may use on one micro-batch.

    The trained model's ``outputs.logits`` (and ``reference.logits``) hold logits only at the
    positions where some loss needs them: ``[n, vocab]``, rows in row-major order of ``positions``.
    ``outputs.features`` (and ``reference.features``) map each layer some defense lists in
    ``feature_layers`` to that decoder block's output, ``[batch, seq, hidden]`` (see ``emguard.blocks``).

    Attributes:
        model: The PEFT model being trained (unwrapped from DDP/accelerate).
        step: The optimizer step this micro-batch contributes to (0-based).
        positions: ``[batch, seq]`` bool: where logits were computed. Position ``t`` predicts token
            ``t + 1``. Assistant-token predictions, or every real token when a defense asks for ``all``.
        targets: ``[n]`` the next token each logits row predicts (IGNORE_INDEX where it is not an
            assistant token).
        counts: Totals over the whole accumulated batch (all micro-batches of this optimizer step,
            all processes): ``assistant_tokens`` (positions with a loss), ``tokens`` (non-padding
            positions), ``sequences`` and ``micro_batches``. A term divides its micro-batch *sum* by the matching
            count, so its scale does not depend on how the batch is split (gradient accumulation,
            devices); this is the normalisation the SFT loss uses.
        reference: Outputs of the same network with the LoRA adapter disabled, computed without
            grad (inside the defenses' hooks), when a defense has ``needs_reference``. No second
            copy of the model exists. Its logits are empty unless a defense has ``needs_reference_logits``.
        forward: ``forward(batch, positions, reference=False)`` runs the trained model (or, with
            ``reference=True``, the reference) on another batch the way the trainer does, for terms
            computed on data other than the training batch (e.g. KL on an anchor set).
    """

    model: Any
    step: int
    counts: Mapping[str, torch.Tensor]
    positions: torch.Tensor
    targets: torch.Tensor
    reference: Any = None
    forward: Callable[..., Any] | None = None


class Defense:
    """Base class: subclasses set ``name`` and ``config_class`` and override what they need."""

    name: ClassVar[str]
    config_class: ClassVar[type[DefenseConfig]]
    #: ``loss`` reads ``ctx.reference`` (the adapter-disabled forward pass).
    needs_reference: bool = False
    #: ``loss`` reads ``ctx.reference.logits`` (if False, the reference pass skips the output head).
    needs_reference_logits: bool = True
    #: Decoder blocks whose outputs ``loss`` reads from ``outputs.features`` / ``ctx.reference.features``
    #: (0-based block indices; may be set in ``prepare``, once the model is known).
    feature_layers: Sequence[int] = ()
    #: Where ``loss`` needs logits: ``assistant`` (predictions of assistant tokens, as SFT) or ``all``
    #: (every non-padding position).
    logit_positions: str = "assistant"
    #: Names of defenses this one cannot run with, and why (a config error names both).
    incompatible_with: ClassVar[Mapping[str, str]] = {}

    def __init__(self, config: DefenseConfig):
        self.config = config
        #: What the defense did that a reader of the run should see (e.g. which modules SafeLoRA
        #: projected); saved under ``defense_reports`` in the manifest when set.
        self.report: dict[str, Any] | None = None

    @property
    def weight(self) -> float:
        """Coefficient of this defense's loss term in the total loss."""
        return 1.0

    @property
    def has_loss(self) -> bool:
        return type(self).loss is not Defense.loss

    def prepare(self, ctx: PrepareContext) -> None:
        """One-off work before training."""

    def transform_dataset(self, examples: list[ChatExample]) -> list[ChatExample]:
        """Return the training conversations this defense trains on instead."""
        return examples

    @contextlib.contextmanager
    def hooks(self, model: Any) -> Iterator[None]:
        """Install forward hooks for one training step; remove them on exit."""
        yield

    def loss(self, batch: Mapping[str, torch.Tensor], outputs: Any, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """Return ``(term, logs)``: the unweighted term (normalised by ``ctx.counts``) and extra scalars to log."""
        raise NotImplementedError

    def finalize(self, model: Any) -> None:
        """Edit the trained weights after training, before they are saved."""
