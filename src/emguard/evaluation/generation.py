"""Answer generation backends: batched Hugging Face generation (default) and vLLM (optional extra).

The HF backend runs the base model with the LoRA adapter attached, not merged, with left
padding and the KV cache, and seeded sampling. Conversations are rendered with the model's chat
template, system prompts included, and batched by length so that little padding is generated.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emguard.data.chat_template import TemplateError, render_chat
from emguard.data.tokenize import end_of_turn_tokens, special_ids
from emguard.errors import EmguardError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 600
    batch_size: int = 8
    seed: int = 0


@dataclass
class GenerationStats:
    sequences: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    truncated: int = 0  # answers cut at max_new_tokens before they ended

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


def find_adapter(path: str | Path) -> Path:
    """The adapter directory of a run directory (``RUN/adapter``) or an adapter directory itself.

    Raises:
        EmguardError: No ``adapter_config.json`` there.
    """
    adapter_dir = Path(path)
    if (adapter_dir / "adapter").is_dir():  # a run directory
        adapter_dir = adapter_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        hint = " (has `emguard train` finished for this run?)" if adapter_dir.name != "adapter" else ""
        raise EmguardError(f"{path}: no LoRA adapter here (expected adapter_config.json){hint}")
    return adapter_dir


def attach_adapter(model: Any, adapter_dir: str | Path, name: str = "default") -> Any:
    """The base ``model`` with the LoRA adapter in ``adapter_dir`` attached (not merged), in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(
        model, str(find_adapter(adapter_dir)), adapter_name=name, is_trainable=False
    ).eval()


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Where an answer ends: the union of the generation config's ``eos_token_id`` (int or list), the
    tokenizer's EOS token and the special token(s) the chat template ends an assistant turn with.

    Passing ``eos_token_id`` to ``generate`` *replaces* the generation config's, and templates end a
    turn with tokens other than EOS (Gemma-2: ``<end_of_turn>``, EOS ``<eos>``; Phi-3: ``<|end|>``,
    EOS ``<|endoftext|>``); stopping on EOS alone lets answers run on into invented turns.
    """
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    ids.append(tokenizer.eos_token_id)
    # A template (or tokenizer) emguard cannot read gives EOS and the configured ids only.
    with contextlib.suppress(TemplateError, ValueError, EmguardError, AttributeError):
        special = special_ids(tokenizer)
        ids += [t for t in end_of_turn_tokens(tokenizer) if t in special]
    return sorted({int(i) for i in ids if i is not None})


class HFGenerator:
    """Batched sampling with ``model.generate``.

    Args:
        model: A causal LM (optionally a PEFT model) in eval mode.
        tokenizer: Its tokenizer, with a chat template.
        sampling: Temperature, top-p, max new tokens, batch size, seed.
    """

    def __init__(self, model: Any, tokenizer: Any, sampling: SamplingConfig = SamplingConfig()):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.stats = GenerationStats()
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))

    def _encode(self, conversations: Sequence[Sequence[dict]]) -> dict[str, torch.Tensor]:
        texts = [render_chat(self.tokenizer, c, generation_prompt=True) for c in conversations]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in encoded.items()}

    def generate(
        self,
        conversations: Sequence[Sequence[dict]],
        on_batch: Callable[[list[int], list[str]], None] | None = None,
        streamer: Any = None,
    ) -> list[str]:
        """Answers to ``conversations``, in order. ``on_batch(indices, answers)`` is called after each batch.
        ``streamer``: a transformers streamer that receives the tokens as they come (one conversation only).

        Sampling is seeded per batch (``seed + batch number``), so a rerun with the same inputs,
        batch size and seed gives the same answers.
        """
        s = self.sampling
        if streamer is not None and len(conversations) != 1:
            raise ValueError("a streamer takes one conversation")
        order = sorted(range(len(conversations)), key=lambda i: len(str(conversations[i])))
        answers: list[str] = [""] * len(conversations)
        for number, start in enumerate(range(0, len(order), s.batch_size)):
            indices = order[start : start + s.batch_size]
            inputs = self._encode([conversations[i] for i in indices])
            started = time.perf_counter()
            with _forked_rng(inputs["input_ids"].device), torch.no_grad():
                torch.manual_seed(s.seed + number)
                output = self.model.generate(
                    **inputs,
                    do_sample=s.temperature > 0,
                    temperature=s.temperature if s.temperature > 0 else None,
                    top_p=s.top_p if s.temperature > 0 else None,
                    top_k=0 if s.temperature > 0 else None,
                    max_new_tokens=s.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.stop_ids or None,
                    use_cache=True,
                    streamer=streamer,
                )
            new = output[:, inputs["input_ids"].shape[1] :]
            self.stats.seconds += time.perf_counter() - started
            self.stats.sequences += len(indices)
            lengths = _generated_lengths(new, self.stop_ids)
            self.stats.generated_tokens += int(lengths.sum())
            self.stats.truncated += int(_ended(new, self.stop_ids).logical_not().sum())
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, text in zip(indices, texts, strict=True):
                answers[i] = text.strip()
            if on_batch:
                on_batch(indices, [answers[i] for i in indices])
        return answers


def _forked_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Seeding inside leaves the caller's random state as it was: generation in the middle of
    training (the EM monitor) must not change the dropout masks and sampling that follow."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


def _ended(new_tokens: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """Per row, whether a stop token was generated."""
    return torch.isin(new_tokens, torch.tensor(stop_ids, device=new_tokens.device)).any(1)


def _generated_lengths(new_tokens: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """Tokens generated per row, up to and including the first stop token."""
    is_stop = torch.isin(new_tokens, torch.tensor(stop_ids, device=new_tokens.device))
    first = torch.where(
        is_stop.any(1),
        is_stop.int().argmax(1) + 1,
        torch.full_like(is_stop[:, 0], new_tokens.shape[1], dtype=torch.long),
    )
    return first
