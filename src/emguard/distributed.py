"""One run in several processes (``accelerate launch`` / ``torchrun``): who writes, who waits.

Every process trains; only the main process writes the run directory (config, manifest, adapter,
checkpoint markers, train log) and pays for judge calls; the others wait at a barrier. Work that
fills a shared cache (the built-in model's conversion, Interleaving++'s losses) runs on the main
process first, so the others read what it wrote instead of writing the same files at once.

All of it goes through accelerate's ``PartialState``, which ``TrainingArguments`` initialises (a
single process is a state with one process: every call here is then a no-op).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from emguard.errors import ConfigError


def _state() -> Any:
    from accelerate import PartialState

    return PartialState()


def is_main_process() -> bool:
    return _state().is_main_process


def num_processes() -> int:
    return _state().num_processes


def wait_for_everyone() -> None:
    _state().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first; the others run it after (e.g. reading its cache).

    The main process releases the others even when its block raises (accelerate's own version
    does not), so they run into the same bad input and stop with the same message instead of
    waiting for a timeout.
    """
    state = _state()
    if state.num_processes == 1:
        yield
        return
    if not state.is_main_process:
        state.wait_for_everyone()
    try:
        yield
    finally:
        if state.is_main_process:
            state.wait_for_everyone()


def shards_parameters() -> bool:
    """Whether the launch shards the weights across processes (FSDP, DeepSpeed): then no single
    process holds a full weight matrix."""
    from accelerate.utils import DistributedType

    return _state().distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def broadcast(value: Any) -> Any:
    """The main process's ``value`` on every process (picklable objects)."""
    if num_processes() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def check_launch() -> None:
    """Refuse several GPUs in one process.

    Without a launcher, ``transformers.Trainer`` wraps the model in ``torch.nn.DataParallel`` when it
    sees several GPUs: the defenses' hooks and captured activations then see one replica's share
    of the batch, and the loss counts are per replica.

    Raises:
        ConfigError: Several visible GPUs and a single process.
    """
    if not torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    gpus = torch.cuda.device_count()
    if gpus > 1:
        raise ConfigError(
            f"{gpus} GPUs are visible to one process: the Trainer would run them as torch.nn.DataParallel, which "
            "emguard's defenses do not support. Start one process per GPU with "
            f"`accelerate launch --num_processes {gpus} -m emguard.cli train CONFIG.yaml` (or torchrun), "
            "or use one GPU: CUDA_VISIBLE_DEVICES=0 emguard train CONFIG.yaml"
        )
