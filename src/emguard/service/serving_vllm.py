"""Chat completions through vLLM (``pip install 'emguard[vllm]'``, a CUDA GPU): one engine per base
model with LoRA enabled; every released model is its job's adapter, attached per request with a
``LoRARequest`` (never merged), so many fine-tunes share one copy of the base weights.

vLLM is imported only here. It cannot be installed on the CPU development machine: the tests run
this file against a stand-in ``vllm`` module that records the calls (tests/test_service_vllm.py).
The offline engine does not stream: a streamed answer arrives as one chunk.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emguard.errors import ConfigError
from emguard.service.serving import Finished, Loader

# vLLM accepts these LoRA ranks; an engine is built for the next one up from the policy's lora.r.
_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def chat_backend(choice: str) -> str:
    """The backend ``choice`` (auto, hf, vllm) resolves to here; vllm without vLLM is a ConfigError."""
    if choice == "vllm" and not vllm_installed():
        raise ConfigError(
            "policy chat_backend is vllm but vLLM is not installed: pip install 'emguard[vllm]' on a CUDA "
            "machine, or set chat_backend: hf"
        )
    if choice == "auto":
        import torch

        return "vllm" if vllm_installed() and torch.cuda.is_available() else "hf"
    return choice


class VLLMEngine:
    """One ``vllm.LLM`` for a base model; adapters get stable LoRA ids in the order first asked for."""

    def __init__(self, spec: str, *, max_loras: int, lora_rank: int, gpu_memory_utilization: float):
        from vllm import LLM

        from emguard.evaluation.generation import stop_token_ids
        from emguard.models import resolve_model

        rank = next((r for r in _RANKS if r >= lora_rank), _RANKS[-1])
        self.llm = LLM(
            model=resolve_model(spec).location,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=rank,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.lock = threading.Lock()  # the offline engine serves one call at a time
        self._lora_ids: dict[str, int] = {}

    def lora_request(self, adapter: Path | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        path = str(adapter)
        with self.lock:
            lora_id = self._lora_ids.setdefault(path, len(self._lora_ids) + 1)  # ids start at 1
        return LoRARequest(f"adapter-{lora_id}", lora_id, path)


class VLLMChat:
    """A base model's engine with one adapter: the ``serving.ChatModel`` interface."""

    def __init__(self, engine: VLLMEngine, adapter: Path | None):
        self.engine, self.lora = engine, engine.lora_request(adapter)
        self.tokenizer = engine.tokenizer

    def complete(
        self, messages: list[dict], *, n: int, max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> tuple[list[tuple[str, str]], int]:
        from vllm import SamplingParams

        from emguard.data.chat_template import chat_messages

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
            stop_token_ids=self.engine.stop_ids,
        )
        with self.engine.lock:
            (output,) = self.engine.llm.chat(
                [chat_messages(self.tokenizer, messages)], params, lora_request=self.lora, use_tqdm=False
            )
        choices = [(o.text.strip(), "length" if o.finish_reason == "length" else "stop") for o in output.outputs]
        return choices, sum(len(o.token_ids) for o in output.outputs)

    def stream(
        self, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Iterator[str | Finished]:
        [(text, reason)], _ = self.complete(
            messages, n=1, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        yield text
        yield Finished(reason)


def vllm_loader(*, max_loras: int, lora_rank: int, gpu_memory_utilization: float) -> Loader:
    """A ``ModelCache`` loader: one engine per base model (built on first use), one ``VLLMChat`` per adapter."""
    engines: dict[str, VLLMEngine] = {}
    lock = threading.Lock()

    def load(spec: str, adapter: Path | None) -> VLLMChat:
        with lock:
            if spec not in engines:
                engines[spec] = VLLMEngine(
                    spec, max_loras=max_loras, lora_rank=lora_rank, gpu_memory_utilization=gpu_memory_utilization
                )
        return VLLMChat(engines[spec], adapter)

    return load
