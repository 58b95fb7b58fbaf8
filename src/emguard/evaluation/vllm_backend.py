"""Optional vLLM generation backend (``pip install emguard[vllm]``, a CUDA GPU).

Same interface as ``HFGenerator`` (``generate(conversations, on_batch)`` and ``stats``). The LoRA
adapter is served unmerged through a ``LoRARequest``; system prompts go through ``LLM.chat`` with
the model's chat template. vLLM is imported only here, so emguard works without it. It cannot be
installed on the CPU development machine, so this file is exercised on GPU machines only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from emguard.data.chat_template import chat_messages
from emguard.errors import EmguardError
from emguard.evaluation.generation import GenerationStats, SamplingConfig, stop_token_ids


def vllm_available() -> bool:
    """vLLM is importable and a CUDA GPU is present."""
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class VLLMGenerator:
    """Batched sampling with vLLM.

    Args:
        model_dir: The base model (a local directory or hub id vLLM can load).
        adapter_dir: A PEFT LoRA adapter directory, or None for the base model.
        sampling: Temperature, top-p, max new tokens, seed (``batch_size`` is the chunk size that
            ``on_batch`` reports at; vLLM schedules its own batches).
        gpu_memory_utilization: Share of GPU memory vLLM may take (the HF model for the probe
            shares the GPU).
    """

    def __init__(
        self,
        model_dir: str,
        adapter_dir: Path | None,
        sampling: SamplingConfig,
        gpu_memory_utilization: float = 0.5,
    ):
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as e:
            raise EmguardError(
                "eval.sampling.backend is vllm but vLLM is not installed: pip install 'emguard[vllm]'"
            ) from e
        rank = None
        if adapter_dir is not None:
            rank = json.loads((adapter_dir / "adapter_config.json").read_text())["r"]
        self.llm = LLM(
            model=model_dir,
            enable_lora=adapter_dir is not None,
            max_lora_rank=max(rank or 16, 16),
            gpu_memory_utilization=gpu_memory_utilization,
            seed=sampling.seed,
        )
        self.lora = LoRARequest("emguard-adapter", 1, str(adapter_dir)) if adapter_dir is not None else None
        self.sampling = sampling
        self.stats = GenerationStats()
        self.tokenizer = self.llm.get_tokenizer()
        # vLLM stops on the generation config's EOS ids; add the template's end of turn (as HFGenerator).
        self.stop_ids = stop_token_ids(self.tokenizer)

    def generate(
        self, conversations: Sequence[Sequence[dict]], on_batch: Callable[[list[int], list[str]], None] | None = None
    ) -> list[str]:
        from vllm import SamplingParams

        s = self.sampling
        answers: list[str] = []
        chunk = max(s.batch_size, 256)
        for number, start in enumerate(range(0, len(conversations), chunk)):
            indices = list(range(start, min(start + chunk, len(conversations))))
            params = SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_new_tokens,
                seed=s.seed + number,
                stop_token_ids=self.stop_ids,
            )
            started = time.perf_counter()
            outputs = self.llm.chat(
                [chat_messages(self.tokenizer, conversations[i]) for i in indices],
                params,
                lora_request=self.lora,
                use_tqdm=False,
            )
            self.stats.seconds += time.perf_counter() - started
            texts = [o.outputs[0].text.strip() for o in outputs]
            self.stats.sequences += len(indices)
            self.stats.generated_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
            answers.extend(texts)
            if on_batch:
                on_batch(indices, texts)
        return answers
