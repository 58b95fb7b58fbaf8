"""Chat completions through vLLM (``pip install 'emguard[vllm]'``, a CUDA GPU): one engine per base
model with LoRA enabled; every released model is its job's adapter, attached per request with a
``LoRARequest`` (never merged), so many fine-tunes share one copy of the base weights.

vLLM is imported only here. It cannot be installed on the CPU development machine: the tests run
this file against a stand-in ``vllm`` module that records the calls (tests/test_service_vllm.py).
The offline engine does not stream: a streamed answer arrives as one chunk. ``chat_gpu_memory_utilization``
is per engine, so it must leave room for every base model's engine and any worker on the same GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emguard.errors import ConfigError
from emguard.service.serving import ChatUnavailable, Finished, Loader

log = logging.getLogger(__name__)

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


def lora_rank_for(r: int) -> int:
    """The smallest rank vLLM accepts that holds adapters of rank ``r``; ConfigError above its largest."""
    if r > _RANKS[-1]:
        raise ConfigError(f"policy lora.r is {r}; vLLM serves LoRA ranks up to {_RANKS[-1]} (or set chat_backend: hf)")
    return next(rank for rank in _RANKS if rank >= r)


class VLLMEngine:
    """One ``vllm.LLM`` for a base model; adapters get stable LoRA ids in the order first asked for."""

    def __init__(
        self, spec: str, *, max_loras: int, max_lora_rank: int, max_model_len: int, gpu_memory_utilization: float
    ):
        from vllm import LLM

        from emguard.evaluation.generation import stop_token_ids
        from emguard.models import resolve_model

        self.llm = LLM(
            model=resolve_model(spec).location,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_model_len=max_model_len,  # the KV cache is sized for the chat limits, not the model's context
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

        copies = n if temperature == 0 else 1  # vLLM refuses n > 1 with greedy decoding: one answer, n copies
        params = SamplingParams(
            n=n // copies,
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
        return choices * copies, copies * sum(len(o.token_ids) for o in output.outputs)

    def stream(
        self, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Iterator[str | Finished]:
        [(text, reason)], _ = self.complete(
            messages, n=1, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        yield text
        yield Finished(reason)


def vllm_loader(**engine_options: Any) -> Loader:
    """A ``ModelCache`` loader: one engine per base model (built on first use, with ``engine_options``:
    ``VLLMEngine``'s keywords), one ``VLLMChat`` per adapter. An engine that failed to start is not
    retried on every request: its base model answers ``ChatUnavailable`` until the server restarts."""
    engines: dict[str, VLLMEngine | Exception] = {}
    lock = threading.Lock()

    def load(spec: str, adapter: Path | None) -> VLLMChat:
        with lock:
            if spec not in engines:
                try:
                    engines[spec] = VLLMEngine(spec, **engine_options)
                except Exception as e:  # out of GPU memory, an unsupported model: logged once, kept
                    log.exception("vLLM could not start an engine for %s", spec)
                    engines[spec] = e
            engine = engines[spec]
        if isinstance(engine, Exception):
            raise ChatUnavailable(f"vLLM could not load the base model ({type(engine).__name__}); see the server log")
        return VLLMChat(engine, adapter)

    return load
