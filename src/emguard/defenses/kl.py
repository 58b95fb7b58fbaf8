"""``kl``: keep the next-token distributions close to the original model's.

``L = L_SFT + λ · Σ_t KL_t / N`` where ``KL_t`` is the KL divergence between the trained and the
reference next-token distributions at position ``t`` (``emguard.losses.token_kl``) and the sum runs
over the selected positions of the accumulated batch: assistant-token predictions (``tokens:
assistant``, ``N`` = number of assistant tokens, the SFT normalisation) or every real token
(``tokens: all``, ``N`` = number of non-padding tokens).

The reference is the same network with the LoRA adapter disabled, run without grad; logits are
computed only at the selected positions and the softmaxes in chunks, so memory grows by about one
``[positions, vocab]`` buffer for the reference logits.

With ``anchor``, the KL is computed on micro-batches drawn from another chat JSONL (e.g. safe
instruction data) instead of the training batch: a variant reported to constrain the model less
on the customer's task. Each anchor micro-batch contributes its mean KL per position divided by
the number of micro-batches in the optimizer step (so the term is a mean over anchor micro-batches,
whatever the gradient accumulation). Anchor micro-batches are drawn in a seeded order determined
by the optimizer step, so a resumed run draws the same ones.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from emguard.config import DefenseConfig
from emguard.data.collate import ChatCollator
from emguard.data.sources import load_examples
from emguard.data.tokenize import TokenizedExample, tokenize_examples
from emguard.defenses.base import Defense, PrepareContext, StepContext
from emguard.errors import ConfigError
from emguard.losses import IGNORE_INDEX, next_token_targets, token_kl

ANCHOR_TAG = "kl-anchor"


class KLConfig(DefenseConfig):
    name: Literal["kl"] = "kl"
    lambda_: Annotated[float, Field(ge=0)] = Field(0.1, alias="lambda", description="Weight λ of the KL term.")
    direction: Literal["forward", "reverse"] = Field(
        "reverse", description="reverse = KL(θ‖ref) (the paper's code), forward = KL(ref‖θ)."
    )
    tokens: Literal["assistant", "all"] = Field(
        "assistant", description="Positions: predictions of assistant tokens, or of every real token."
    )
    anchor: str | None = Field(
        None, description="Chat JSONL or builtin:NAME to compute the KL on instead of the training batch."
    )
    chunk_rows: Annotated[int, Field(gt=0)] | None = Field(
        None, description="Positions per softmax chunk; null = 16 on the CPU, 512 on a GPU."
    )


class KLDefense(Defense):
    name = "kl"
    config_class = KLConfig
    config: KLConfig

    def __init__(self, config: KLConfig):
        super().__init__(config)
        self.needs_reference = config.anchor is None  # with an anchor set, loss runs its own passes
        self.logit_positions = config.tokens if config.anchor is None else "assistant"
        self._anchor: list[TokenizedExample] = []
        self._collator: ChatCollator | None = None
        self._seed = 0
        self._micro_batch = 1
        self._calls: tuple[int, int] = (-1, 0)  # (step, micro-batches seen in that step)

    @property
    def weight(self) -> float:
        return self.config.lambda_

    def prepare(self, ctx: PrepareContext) -> None:
        if self.config.anchor is None:
            return
        examples = load_examples(self.config.anchor, seed=ctx.config.training.seed)
        examples = [type(e)(e.messages, e.source, e.line, ANCHOR_TAG, e.metadata) for e in examples]
        self._anchor = tokenize_examples(
            ctx.tokenizer, examples, max_length=ctx.config.max_sequence_length(), overlong="drop"
        )
        self._micro_batch = ctx.config.training.micro_batch_size
        if len(self._anchor) < self._micro_batch:
            raise ConfigError(
                f"defenses: kl.anchor {self.config.anchor} has {len(self._anchor)} usable examples, fewer than "
                f"training.micro_batch_size={self._micro_batch}; use a larger anchor set"
            )
        self._collator = ChatCollator(ctx.tokenizer.pad_token_id, (ANCHOR_TAG,), pad_to_multiple_of=8)
        self._seed = ctx.config.training.seed

    def loss(self, batch: Mapping[str, torch.Tensor], outputs: Any, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        if self.config.anchor is not None:
            return self._anchor_loss(batch, ctx)
        kl = token_kl(outputs.logits, ctx.reference.logits, self.config.direction, self.config.chunk_rows)
        if self.config.tokens == "assistant":
            kl = kl[ctx.targets != IGNORE_INDEX]
            return kl.sum() / ctx.counts["assistant_tokens"], {}
        return kl.sum() / ctx.counts["tokens"], {}

    def _anchor_loss(self, batch: Mapping[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict]:
        step, seen = self._calls
        self._calls = (ctx.step, seen + 1 if step == ctx.step else 1)
        anchor = self._anchor_batch(ctx.step, self._calls[1] - 1, int(ctx.counts["micro_batches"]))
        anchor = {k: v.to(batch["input_ids"].device) for k, v in anchor.items()}
        targets = next_token_targets(anchor["labels"])
        positions = anchor["attention_mask"].bool() if self.config.tokens == "all" else targets != IGNORE_INDEX
        reference = ctx.forward(anchor, positions, reference=True)
        outputs = ctx.forward(anchor, positions)
        kl = token_kl(outputs.logits, reference.logits, self.config.direction, self.config.chunk_rows)
        mean = kl.sum() / positions.sum().clamp(min=1)
        # Both are shares of the step's mean over its anchor micro-batches (all processes): the
        # trainer sums logged values over micro-batches and processes, so a logged `mean` would be
        # (micro-batches × processes) times too large.
        share = mean / ctx.counts["micro_batches"]
        return share, {"anchor_kl": share.detach()}

    def _anchor_batch(self, step: int, micro: int, micro_per_step: int) -> dict[str, torch.Tensor]:
        """The anchor micro-batch for (step, micro): a seeded permutation per pass over the anchor set."""
        per_pass = len(self._anchor) // self._micro_batch
        # micro_per_step counts all processes: process r takes every world-size-th slot from r.
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        index = step * micro_per_step + micro * world + rank
        epoch, position = divmod(index, per_pass)
        order = list(range(len(self._anchor)))
        random.Random(f"kl-anchor-{self._seed}-{epoch}").shuffle(order)
        chosen = order[position * self._micro_batch : (position + 1) * self._micro_batch]
        assert self._collator is not None
        return self._collator([self._anchor[i] for i in chosen])
