"""The persona vector and how well each layer's vector separates the two sides.

With ``a⁺_i[ℓ]`` (answers under the trait system prompts, kept by the judge) and ``a⁻_j[ℓ]``
(answers under the helpful ones) from ``emguard.persona.activations``:

    1. v[ℓ] = mean_i a⁺_i[ℓ] − mean_j a⁻_j[ℓ]                       (per layer, all layers kept)
    2. p_i[ℓ] = a_i[ℓ] · v[ℓ] / ‖v[ℓ]‖                               (projection on the unit vector)
    3. separation[ℓ] = (mean p⁺ − mean p⁻) / sqrt((var p⁺ + var p⁻) / 2)   (Cohen's d)

The steering layer is a decoder block ``b``; its vector is row ``b + 1``. A large separation says
the direction distinguishes the trait at that depth; steering usually works best in the middle
layers, so the report lists every layer and the user picks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from emguard.fsio import atomic_write_bytes

TENSOR_NAME = "persona_vector"
LAYER_CONVENTION = "row 0 = token embeddings; row b + 1 = output of decoder block b (steering layer b)"


def mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """``v[ℓ] = mean a⁺[ℓ] − mean a⁻[ℓ]`` from ``[N, layers, hidden]`` activations."""
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("a persona vector needs at least one kept answer on each side")
    return positive.double().mean(0).sub(negative.double().mean(0)).float()


def layer_separation(vector: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> list[dict[str, Any]]:
    """Per layer: vector norm, mean projections of both sides, and their Cohen's d (see the module docstring)."""
    unit = vector / vector.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    pos = torch.einsum("nlh,lh->nl", positive.float(), unit)
    neg = torch.einsum("nlh,lh->nl", negative.float(), unit)
    pooled = ((pos.var(0, unbiased=len(pos) > 1) + neg.var(0, unbiased=len(neg) > 1)) / 2).sqrt()
    rows = []
    for row in range(vector.shape[0]):
        d = (pos[:, row].mean() - neg[:, row].mean()) / pooled[row].clamp(min=1e-12)
        rows.append(
            {
                "row": row,
                "steering_layer": row - 1 if row > 0 else None,
                "norm": round(float(vector[row].norm()), 5),
                "projection_trait": round(float(pos[:, row].mean()), 5),
                "projection_helpful": round(float(neg[:, row].mean()), 5),
                "separation": round(float(d), 4),
            }
        )
    return rows


def recommended_layer(rows: list[dict[str, Any]]) -> int:
    """The decoder block with the largest separation, among the middle blocks (first and last quarter excluded)."""
    blocks = [r for r in rows if r["steering_layer"] is not None]
    quarter = len(blocks) // 4
    middle = blocks[quarter : len(blocks) - quarter] or blocks
    return max(middle, key=lambda r: r["separation"])["steering_layer"]


def save_vector(path: Path, vector: torch.Tensor, metadata: dict[str, Any]) -> None:
    """One safetensors tensor ``persona_vector`` [layers, hidden]; metadata values JSON-encoded when not strings."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_write_bytes(path, save({TENSOR_NAME: vector.contiguous().float()}, metadata=meta))
