"""Compute the output head only where logits are needed.

A causal LM's head (``hidden @ W_vocab``) on every position is a large share of a small model's
compute (SmolLM2-135M: 49k-word vocabulary, ~20% of the FLOPs) and its ``[batch, seq, vocab]``
output dominates activation memory. Training needs it only at positions that predict an
assistant token (or, for some defenses, at every real token).

``logits_at(model, positions)`` installs a forward pre-hook on the output head that keeps only
``hidden[positions]``: the model's own forward still runs, so architecture-specific logit scaling
or soft-capping applies unchanged and a DDP/FSDP wrapper still sees its forward, and
``outputs.logits`` becomes ``[n_selected, vocab]`` in row-major order of ``positions``.
``selection_is_exact`` checks once per model that this equals slicing the full logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def output_head(model: Any) -> torch.nn.Module:
    """The output embedding of a (possibly PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embedding (not a causal LM?)")
    return head


@contextlib.contextmanager
def logits_at(head: torch.nn.Module, positions: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the output ``head`` runs only at ``positions`` (``[batch, seq]`` bool).

    ``None`` leaves the model unchanged (full ``[batch, seq, vocab]`` logits).
    """
    if positions is None:
        yield
        return

    def keep_selected(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden[positions], *args[1:])

    handle = head.register_forward_pre_hook(keep_selected)
    try:
        yield
    finally:
        handle.remove()


def selection_is_exact(model: Any, head: torch.nn.Module) -> bool:
    """Whether ``logits_at(head, ...)`` gives exactly the full logits at the selected positions.

    Args:
        model: What the forward pass is called on (a DDP/FSDP wrapper is fine).
        head: Its output head.
    """
    vocab_size, device = head.weight.shape[0], head.weight.device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 6), generator=generator).to(device)
    mask = torch.ones_like(ids)
    positions = torch.rand(2, 6, generator=generator).to(device) < 0.5
    positions[0, 0] = True
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            with logits_at(head, positions):
                selected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    except (RuntimeError, IndexError, ValueError):  # a forward that reshapes the head's output
        return False
    finally:
        model.train(was_training)
    return selected.shape == full[positions].shape and torch.allclose(selected, full[positions], rtol=1e-4, atol=1e-5)
