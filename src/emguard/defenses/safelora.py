"""``safelora``: project the LoRA updates that stray from the alignment direction (Hsu et al., 2024).

SafeLoRA (arXiv 2405.16833; a baseline of arXiv 2508.06249) edits the adapter once, after training.
For each LoRA-adapted Linear, with weights ``W_a`` in the aligned model (the one trained on) and
``W_u`` in the model before alignment (same names and shapes):

1. ``V = W_a − W_u`` ``[out, in]``;
2. ``C = V Vᵀ / ‖V‖_F`` ``[out, out]``, the paper's normalisation: ``C`` maps into the column span of
   ``V`` but is not an orthogonal projector (``C² ≠ C``; it rescales by ``V``'s spectrum);
3. ``ΔW = s · B A`` (``s`` the LoRA scaling);
4. ``sim = ⟨C ΔW, ΔW⟩_F / (‖C ΔW‖_F ‖ΔW‖_F)``, the cosine of the flattened matrices;
5. the modules with ``sim < threshold`` (or, with ``num_projected: N``, the N least similar; the
   paper's default is N = 10) get ``B ← C B``, so their update becomes ``C ΔW``.

Modules pair with checkpoint tensors by name (``model.layers.0.mlp.up_proj`` ↔ ``…up_proj.weight``),
never by position; biases are left alone. Where ``V = 0``, ``C = 0`` and ``sim = 0``: projecting
removes that module's update. Cost: ``prepare`` reads safetensors headers only (names and shapes are
checked before training); ``finalize`` reads each targeted tensor once, one module at a time, and
computes ``C B`` as ``V (Vᵀ B) / ‖V‖_F``: no second model in memory, ``C`` never formed, a few
``[out, in]`` float32 tensors at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from safetensors import safe_open

from emguard.config import DefenseConfig
from emguard.defenses.base import Defense, PrepareContext
from emguard.errors import ConfigError
from emguard.models import resolve_model

ADAPTER = "default"
log = logging.getLogger(__name__)


class SafeLoRAConfig(DefenseConfig):
    name: Literal["safelora"] = "safelora"
    unaligned_model: str = Field(description="builtin:NAME, HF id or local dir: the model before alignment.")
    aligned_model: str | None = Field(None, description="The aligned model; null = the run's model.")
    threshold: Annotated[float, Field(ge=-1, le=1)] = Field(
        0.5, description="Project the modules whose similarity is below this (unless num_projected is set)."
    )
    num_projected: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Instead of threshold: project the N least similar modules (the paper uses N = 10)."
    )


def safelora_projector(w_aligned: torch.Tensor, w_unaligned: torch.Tensor) -> torch.Tensor:
    """``C = V Vᵀ / ‖V‖_F`` with ``V = W_aligned − W_unaligned`` (steps 1–2), float32 ``[out, out]``."""
    v = w_aligned.float() - w_unaligned.float()
    return v @ v.T / v.norm().clamp_min(torch.finfo(torch.float32).tiny)


def apply_projector(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``C x = V (Vᵀ x) / ‖V‖_F`` for ``V`` ``[out, in]`` and ``x`` ``[out, k]``, without forming ``C``."""
    return v @ (v.T @ x) / v.norm().clamp_min(torch.finfo(torch.float32).tiny)


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``⟨a, b⟩_F / (‖a‖_F ‖b‖_F)``; 0 when either is zero."""
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def projection_similarity(c: torch.Tensor, delta: torch.Tensor) -> float:
    """Step 4: ``cos(C ΔW, ΔW)`` of the flattened matrices."""
    return flat_cosine(c @ delta, delta)


def plan_projection(similarities: Mapping[str, float], threshold: float, num_projected: int | None) -> set[str]:
    """Step 5: the ``num_projected`` least similar modules (ties by name), or those below ``threshold``."""
    if num_projected is not None:
        return set(sorted(similarities, key=lambda name: (similarities[name], name))[:num_projected])
    return {name for name, sim in similarities.items() if sim < threshold}


def checkpoint_index(spec: str, role: str) -> tuple[str, dict[str, tuple[Path, tuple[int, ...]]]]:
    """``(location, {tensor name: (safetensors file, shape)})`` of model ``spec``, from the file headers only."""
    resolved = resolve_model(spec)
    location = Path(resolved.location)
    if resolved.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            location = Path(snapshot_download(resolved.location, allow_patterns=["*.safetensors", "*.json"]))
        except OSError as e:
            raise ConfigError(f"defenses: safelora.{role} {spec!r}: could not fetch its safetensors ({e})") from None
    index = {}
    for file in sorted(location.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            index.update({key: (file, tuple(handle.get_slice(key).get_shape())) for key in handle.keys()})  # noqa: SIM118
    if not index:
        raise ConfigError(f"defenses: safelora.{role} {spec!r}: no .safetensors weights in {location}")
    return resolved.location, index


def lora_modules(model: Any) -> dict[str, Any]:
    """The LoRA layers of a PEFT model by checkpoint module name (``base_model.model.``/``.base_layer`` removed)."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): m
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A
    }


class SafeLoRADefense(Defense):
    name = "safelora"
    config_class = SafeLoRAConfig
    config: SafeLoRAConfig

    def __init__(self, config: SafeLoRAConfig):
        super().__init__(config)
        self._indexes: dict[str, dict] = {}  # role -> checkpoint index; no aligned_model: the run's own weights

    def prepare(self, ctx: PrepareContext) -> None:
        from emguard.distributed import shards_parameters

        if shards_parameters():
            raise ConfigError(
                "defenses: safelora edits whole weight matrices after training, which a sharded launch (FSDP, "
                "DeepSpeed) does not hold in one process; launch with plain DDP (accelerate launch without "
                "--use_fsdp/--use_deepspeed) or one process"
            )
        specs = {"unaligned_model": self.config.unaligned_model, "aligned_model": self.config.aligned_model}
        at = {"aligned_model": resolve_model(ctx.config.model).location}
        for role, spec in specs.items():
            if spec:
                at[role], self._indexes[role] = checkpoint_index(spec, role)
        if at["unaligned_model"] == at["aligned_model"]:
            raise ConfigError(
                f"defenses: safelora.unaligned_model {specs['unaligned_model']!r} is the aligned model itself (V = 0); "
                "give the base model the aligned model was tuned from"
            )
        modules = lora_modules(ctx.model)
        if not modules:
            raise ConfigError("defenses: safelora needs a LoRA adapter, and the model has no LoRA layers")
        for name, module in modules.items():
            base, key = module.get_base_layer(), f"{name}.weight"
            if not isinstance(base, torch.nn.Linear):
                raise ConfigError(f"defenses: safelora edits Linear layers only; {name} is a {type(base).__name__}")
            for role, index in self._indexes.items():
                shape, found = tuple(base.weight.shape), index[key][1] if key in index else None
                if found != shape:
                    problem = f"has no tensor {key!r}" if found is None else f"has {key} of shape {found}, not {shape}"
                    raise ConfigError(
                        f"defenses: safelora.{role} {specs[role]!r} {problem} (LoRA-targeted module {name}); modules "
                        "pair by name and shape: use the base model the aligned model was tuned from"
                    )

    def _weight(self, role: str, name: str, module: Any, device: torch.device) -> torch.Tensor:
        if role not in self._indexes:  # the run's aligned model: its frozen base weights are in memory
            return module.get_base_layer().weight.to(device, torch.float32)
        with safe_open(str(self._indexes[role][f"{name}.weight"][0]), framework="pt") as handle:
            return handle.get_tensor(f"{name}.weight").to(device, torch.float32)

    def finalize(self, model: Any) -> None:
        if "unaligned_model" not in self._indexes:
            raise RuntimeError("safelora: prepare() must run before finalize()")
        modules, similarities, projected_b = lora_modules(model), {}, {}
        with torch.no_grad():
            for name, module in modules.items():
                a, b, s = module.lora_A[ADAPTER].weight.float(), module.lora_B[ADAPTER].weight, module.scaling[ADAPTER]
                w_aligned = self._weight("aligned_model", name, module, b.device)  # may be the model's own tensor
                v = w_aligned - self._weight("unaligned_model", name, module, b.device)  # 1.
                if not v.any():
                    log.warning("safelora: %s is equal in both models (V = 0); projecting removes its update", name)
                projected_b[name] = apply_projector(v, b.float())  # 2. C B
                delta = s * b.float() @ a  # 3.
                similarities[name] = flat_cosine(s * projected_b[name] @ a, delta)  # 4.
            chosen = plan_projection(similarities, self.config.threshold, self.config.num_projected)  # 5.
            for name in chosen:
                b = modules[name].lora_B[ADAPTER].weight
                b.copy_(projected_b[name].to(b.dtype))
        n = self.config.num_projected
        rule = f"the {n} least similar" if n is not None else f"similarity < {self.config.threshold}"
        self.report = {
            "rule": rule,
            "projected": len(chosen),
            "modules": {m: {"similarity": sim, "projected": m in chosen} for m, sim in sorted(similarities.items())},
        }
        log.info("safelora: projected %d of %d LoRA modules (%s)", len(chosen), len(similarities), rule)
