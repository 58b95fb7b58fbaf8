"""``steering`` (preventive steering): add ``α · v`` to one decoder block's output while training.

During every training step's forward passes (and their recomputation under gradient
checkpointing) the output of decoder block ``layer`` becomes ``h + α · v`` at every position; ``v``
is typically the "evil" persona vector, so the optimiser need not move the weights toward it to fit
misaligned data. The hook is removed after each step, so evaluation, generation, the EM monitor and
the saved adapter never see it.

**With kl or ldifs** the reference pass (the adapter-disabled network) is steered too. Both terms
should measure what the *adapter* changed; with an unsteered reference they would also measure
``α · v`` itself (KL between a steered and an unsteered network, or ``‖α v + …‖²`` in every block
after ``layer``), and their gradient would train the adapter to cancel the steering: the two
defenses would fight. Steered on both sides, the terms are exactly zero at step 0 (tested).

**Layer convention:** ``layer`` is the 0-based index of the decoder block whose *output* is
steered (``model.layers[layer]``), i.e. ``hidden_states[layer + 1]`` in Hugging Face terms. The
vector file is safetensors holding either a ``[hidden]`` vector, or a per-layer stack
``[num_blocks, hidden]`` (row ``ℓ`` = block ``ℓ``'s output) or ``[num_blocks + 1, hidden]`` (row 0
= embeddings, row ``ℓ + 1`` = block ``ℓ``'s output, the persona-vector convention); ``key`` names
the tensor when the file holds several.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file

from emguard.blocks import block_hidden, check_layers, decoder_blocks, with_block_hidden
from emguard.config import DefenseConfig
from emguard.defenses.base import Defense, PrepareContext
from emguard.errors import ConfigError


class SteeringConfig(DefenseConfig):
    name: Literal["steering"] = "steering"
    vector: str = Field(description="safetensors file with the steering vector (e.g. from emguard persona extract).")
    layer: int = Field(description="0-based decoder block whose output is steered (negative counts from the end).")
    alpha: float = Field(5.0, description="Steering coefficient α.")
    key: str | None = Field(None, description="Tensor name in the file, if it holds several.")
    normalize: bool = Field(False, description="Scale v to unit norm first (α is then the added norm).")


def load_steering_vector(path: str | Path, key: str | None, layer: int, num_blocks: int, hidden: int) -> torch.Tensor:
    """Read the vector for block ``layer`` from a safetensors file (see the module docstring).

    Raises:
        ConfigError: Missing/unreadable file, ambiguous or unknown key, or a shape that does not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"defenses: steering.vector {path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"defenses: steering.vector {path}: not a readable safetensors file ({e})") from None
    if key is None:
        if len(tensors) != 1:
            raise ConfigError(
                f"defenses: steering.vector {path} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); "
                "set steering.key to the one to use"
            )
        key = next(iter(tensors))
    if key not in tensors:
        raise ConfigError(f"defenses: steering.key {key!r} is not in {path} (it has {', '.join(sorted(tensors))})")
    v = tensors[key]
    if v.dim() == 2 and v.shape[0] == num_blocks:
        v = v[layer]
    elif v.dim() == 2 and v.shape[0] == num_blocks + 1:
        v = v[layer + 1]
    if v.shape != (hidden,):
        raise ConfigError(
            f"defenses: steering vector {key!r} in {path} has shape {tuple(tensors[key].shape)}; expected ({hidden},), "
            f"({num_blocks}, {hidden}) or ({num_blocks + 1}, {hidden}) for this model"
        )
    if not torch.isfinite(v).all():
        raise ConfigError(f"defenses: steering vector {key!r} in {path} contains NaN or inf")
    return v.float()


class SteeringDefense(Defense):
    name = "steering"
    config_class = SteeringConfig
    config: SteeringConfig

    def __init__(self, config: SteeringConfig):
        super().__init__(config)
        self.vector: torch.Tensor | None = None
        self.layer: int = config.layer

    def prepare(self, ctx: PrepareContext) -> None:
        blocks = decoder_blocks(ctx.model)
        try:
            (self.layer,) = check_layers([self.config.layer], len(blocks), "defenses: steering.layer")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        hidden = ctx.model.get_base_model().config.hidden_size
        v = load_steering_vector(self.config.vector, self.config.key, self.layer, len(blocks), hidden)
        if self.config.normalize:
            v = v / v.norm().clamp(min=1e-12)
        self.vector = v

    @contextlib.contextmanager
    def hooks(self, model: Any) -> Iterator[None]:
        """Steer every forward pass inside the block (the trainer enters it for each training step:
        reference pass, trained pass and backward; generation inside it is steered too)."""
        if self.vector is None:
            raise RuntimeError("steering: prepare() must run before hooks()")
        with add_to_block_output(decoder_blocks(model)[self.layer], self.config.alpha * self.vector):
            yield


@contextlib.contextmanager
def add_to_block_output(block: torch.nn.Module, shift: torch.Tensor) -> Iterator[None]:
    """Within the block, ``block``'s output becomes ``h + shift`` at every position, in training and
    eval mode; the hook is removed on exit, also on exceptions."""
    cast: dict[tuple, torch.Tensor] = {}

    def steer(module: torch.nn.Module, args: Any, output: Any) -> Any:
        hidden = block_hidden(output)
        key = (hidden.dtype, hidden.device)
        if key not in cast:
            cast[key] = shift.to(dtype=hidden.dtype, device=hidden.device)
        return with_block_hidden(output, hidden + cast[key])

    handle = block.register_forward_hook(steer)
    try:
        yield
    finally:
        handle.remove()
