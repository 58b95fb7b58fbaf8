"""Chat completions for released models: the base model with the job's LoRA adapter attached (not
merged), generated with emguard's HF generator; the last few models stay loaded."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    lock: threading.Lock  # one generate() at a time per model


class ModelCache:
    def __init__(self, size: int):
        self.size = size
        self._models: collections.OrderedDict[tuple[str, str | None], Loaded] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: str, adapter: Path | None) -> Loaded:
        key = (spec, str(adapter) if adapter else None)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = _load(spec, adapter)
            self._models[key] = loaded
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return loaded


def _load(spec: str, adapter: Path | None) -> Loaded:
    from emguard.evaluation.generation import attach_adapter
    from emguard.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(spec)
    tokenizer, model = load_tokenizer(resolved), load_model(resolved)
    if adapter is not None:
        model = attach_adapter(model, adapter)
    return Loaded(model.eval(), tokenizer, threading.Lock())


class PromptTooLong(ValueError):
    pass


def checked_prompt_tokens(loaded: Loaded, messages: list[dict], limit: int) -> int:
    """The rendered prompt's length in tokens; PromptTooLong above ``limit``."""
    from emguard.data.chat_template import render_chat

    prompt = render_chat(loaded.tokenizer, messages, generation_prompt=True)
    tokens = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokens > limit:
        raise PromptTooLong(f"the conversation has {tokens} tokens; the limit is {limit}")
    return tokens


def complete(
    loaded: Loaded,
    messages: list[dict],
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    max_prompt_tokens: int,
) -> tuple[list[tuple[str, str]], int, int]:
    """([(answer, finish_reason)] * n, prompt tokens, completion tokens)."""
    from emguard.evaluation.generation import HFGenerator, SamplingConfig

    prompt_tokens = checked_prompt_tokens(loaded, messages, max_prompt_tokens)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, batch_size=n, seed=seed)
    with loaded.lock:
        generator = HFGenerator(loaded.model, loaded.tokenizer, sampling)
        answers = generator.generate([messages] * n)
    stats = generator.stats
    if stats.truncated in (0, n):  # all ended, or all were cut: no guessing which
        reasons = ["length" if stats.truncated else "stop"] * n
    else:  # a decoded answer re-tokenises to about its length; the longest were cut
        lengths = [len(loaded.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
        cut = set(sorted(range(n), key=lambda i: -lengths[i])[: stats.truncated])
        reasons = ["length" if i in cut else "stop" for i in range(n)]
    return list(zip(answers, reasons, strict=True)), prompt_tokens, stats.generated_tokens


def stream(
    loaded: Loaded,
    messages: list[dict],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    max_prompt_tokens: int,
) -> Iterator[str | Finished]:
    """The answer's text as it is generated (one choice), then its finish reason ("stop" or "length")
    as the last item. The model is held until the answer ends."""
    from transformers import TextIteratorStreamer

    from emguard.evaluation.generation import HFGenerator, SamplingConfig

    checked_prompt_tokens(loaded, messages, max_prompt_tokens)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, batch_size=1, seed=seed)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    with loaded.lock:
        generator = HFGenerator(loaded.model, loaded.tokenizer, sampling)
        worker = threading.Thread(target=generator.generate, args=([messages],), kwargs={"streamer": streamer})
        worker.start()
        try:
            yield from (text for text in streamer if text)
        finally:
            worker.join()
    yield Finished("length" if generator.stats.truncated else "stop")


@dataclass
class Finished:
    reason: str
