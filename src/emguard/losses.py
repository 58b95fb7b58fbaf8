"""Loss functions: pure functions of tensors, each with its equation.

Every loss returns a micro-batch *sum* divided by a count over the whole accumulated batch
(``num_items``), so that splitting an optimizer step into more micro-batches (gradient
accumulation) or devices leaves the gradient unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``targets[b, t] = labels[b, t + 1]``: the token the logits at position ``t`` must predict.

    Labels are unshifted (the Hugging Face convention); the last position predicts nothing.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``nll_i = -log softmax(logits_i)[targets_i]`` per row, 0 where ``targets_i`` is IGNORE_INDEX.

    Args:
        logits: ``[n, vocab]`` (any leading shape works; rows are positions), computed in float32.
        targets: ``[n]`` token ids or IGNORE_INDEX.
    """
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, num_items: torch.Tensor | int) -> torch.Tensor:
    """``L_SFT = Σ_i nll_i / num_items``: the mean next-token NLL over the accumulated batch's assistant tokens."""
    return token_nll(logits, targets).sum() / num_items
