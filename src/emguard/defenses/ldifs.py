"""``ldifs``: keep intermediate features close to the original model's (feature-space L2).

``L = L_SFT + λ · Σ_t Σ_{ℓ∈layers} ‖h_θ^ℓ(t) − h_ref^ℓ(t)‖² / N`` where ``h^ℓ(t)`` is the output of
decoder block ``ℓ`` (the residual stream, see ``emguard.blocks``) at position ``t``, the sum runs
over the real (non-padding) tokens of the accumulated batch and ``N`` is their number: a mean over
tokens of the summed squared distances.

The trained model's features are the ones its forward pass computed, so the gradient flows
through them into the LoRA weights (the original authors computed them under ``no_grad``, which
silently trained plain SFT). The reference features come from the adapter-disabled pass, which
skips the output head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from emguard.blocks import check_layers, decoder_blocks
from emguard.config import DefenseConfig
from emguard.defenses.base import Defense, PrepareContext, StepContext
from emguard.errors import ConfigError
from emguard.losses import feature_sq_distance


class LDIFSConfig(DefenseConfig):
    name: Literal["ldifs"] = "ldifs"
    lambda_: Annotated[float, Field(ge=0)] = Field(1.0, alias="lambda", description="Weight λ of the feature term.")
    layers: list[int] | None = Field(
        None,
        description="0-based decoder blocks whose outputs are compared; default: 5 evenly spaced, ending at the last.",
    )
    num_layers: Annotated[int, Field(gt=0)] = Field(
        5, description="How many evenly spaced blocks when layers is unset."
    )


def evenly_spaced_layers(num_blocks: int, count: int) -> list[int]:
    """``count`` block indices spread evenly over ``num_blocks``, the last block included.

    E.g. 30 blocks, 5 layers -> [5, 11, 17, 23, 29].
    """
    count = min(count, num_blocks)
    return sorted({round((k + 1) * num_blocks / count) - 1 for k in range(count)})


class LDIFSDefense(Defense):
    name = "ldifs"
    config_class = LDIFSConfig
    config: LDIFSConfig
    needs_reference = True
    needs_reference_logits = False

    @property
    def weight(self) -> float:
        return self.config.lambda_

    def prepare(self, ctx: PrepareContext) -> None:
        num_blocks = len(decoder_blocks(ctx.model))
        if self.config.layers is None:
            self.feature_layers = evenly_spaced_layers(num_blocks, self.config.num_layers)
            return
        try:
            self.feature_layers = sorted(set(check_layers(self.config.layers, num_blocks, "defenses: ldifs.layers")))
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def loss(self, batch: Mapping[str, torch.Tensor], outputs: Any, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        mask = batch["attention_mask"].bool()
        total = sum(
            feature_sq_distance(outputs.features[layer][mask], ctx.reference.features[layer][mask]).sum()
            for layer in self.feature_layers
        )
        return total / ctx.counts["tokens"], {}
