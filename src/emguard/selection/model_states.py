"""Score one base model in several states (no adapter, each misaligned adapter) without reloading it.

``adapter_state(model, adapter_dir)`` yields the network as it behaves with that adapter (or with
none) and restores it afterwards: a PEFT model gets the adapter loaded under a temporary name,
activated, then deleted, with every parameter's ``requires_grad`` put back (so a model being
trained is left exactly as it was); a plain model is wrapped and unwrapped again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TEMPORARY = "emguard-scoring"


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextlib.contextmanager
def adapter_state(model: Any, adapter_dir: Path | None) -> Iterator[Any]:
    """``model`` with only ``adapter_dir``'s LoRA adapter active, or with no adapter when it is None."""
    if adapter_dir is None:
        if _is_peft(model):
            with model.disable_adapter():
                yield model
        else:
            yield model
        return
    if not _is_peft(model):
        from peft import PeftModel

        wrapped = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        try:
            yield wrapped
        finally:
            wrapped.unload()  # takes the LoRA layers out of the (shared) base modules again
        return
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    previous = model.active_adapter
    model.load_adapter(str(adapter_dir), adapter_name=_TEMPORARY, is_trainable=False)
    try:
        model.set_adapter(_TEMPORARY)
        yield model
    finally:
        model.set_adapter(previous)
        model.delete_adapter(_TEMPORARY)
        for name, p in model.named_parameters():
            p.requires_grad_(grads.get(name, False))
