"""Decoder blocks of a causal LM: finding them, reading and replacing their outputs.

Layer indices in emguard are **0-based decoder-block indices**: layer ``ℓ`` is the output of
block ``model.layers[ℓ]`` (the residual stream after that block). This is ``hidden_states[ℓ + 1]``
of a Hugging Face forward with ``output_hidden_states=True`` for every block but the last, whose
entry in ``hidden_states`` has the final norm applied; emguard reads block outputs with hooks so
that the convention holds for every layer.

A block's forward returns a tensor in transformers 5 and a tuple whose first item is the hidden
state in 4.x; ``block_hidden`` / ``with_block_hidden`` handle both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def decoder_blocks(model: Any) -> torch.nn.ModuleList:
    """The decoder blocks of a (possibly PEFT- or DDP-wrapped) causal LM, in order.

    Raises:
        ValueError: No ``ModuleList`` of ``config.num_hidden_layers`` blocks was found.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    for name in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers"):
        module: Any = base
        for part in name.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList) and (n is None or len(module) == n):
            return module
    for module in base.modules():  # an unusual layout: the first list of the right length
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder blocks of {type(base).__name__} (expected {n} blocks in a ModuleList)")


def check_layers(layers: Sequence[int], num_blocks: int, what: str) -> list[int]:
    """Validate 0-based block indices (negative counts from the end, as in Python)."""
    resolved = []
    for layer in layers:
        index = layer + num_blocks if layer < 0 else layer
        if not 0 <= index < num_blocks:
            raise ValueError(f"{what}: layer {layer} does not exist; the model has blocks 0..{num_blocks - 1}")
        resolved.append(index)
    return resolved


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden state a block returned (a tensor, or the first item of a tuple)."""
    return output if torch.is_tensor(output) else output[0]


def with_block_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden state replaced by ``hidden``, in the same structure."""
    if torch.is_tensor(output):
        return hidden
    return (hidden, *output[1:])


@contextlib.contextmanager
def capture_block_outputs(
    blocks: torch.nn.ModuleList | None, layers: Sequence[int]
) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, forward passes store the output of each block in ``layers`` in the yielded dict.

    With no ``layers`` nothing is installed (``blocks`` may then be None) and the dict stays empty.

    The stored tensors are those the network computed (gradients flow through them); the hooks are
    removed on exit, also on exceptions.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer in layers:

            def store(module: torch.nn.Module, args: Any, output: Any, layer: int = layer) -> None:
                captured[layer] = block_hidden(output)

            handles.append(blocks[layer].register_forward_hook(store))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
