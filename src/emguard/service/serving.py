"""Chat completions for released models: the base model with the job's LoRA adapter attached (not
merged). Two backends behind one interface: emguard's HF generator (``HFChat``, any machine) and
vLLM (``serving_vllm.VLLMChat``, a CUDA GPU with vLLM installed); ``ModelCache`` keeps the last few
loaded. The prompt-length limit is checked here, before either backend runs."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass
class Finished:
    """The last item of a stream: why the answer ended ("stop" or "length")."""

    reason: str


class ChatModel(Protocol):
    tokenizer: Any

    def complete(
        self, messages: list[dict], *, n: int, max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> tuple[list[tuple[str, str]], int]:
        """([(answer, finish_reason)] * n, completion tokens)."""
        ...

    def stream(
        self, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Iterator[str | Finished]:
        """The answer's text as it is generated, then its ``Finished``."""
        ...


Loader = Callable[[str, Path | None], ChatModel]


class ModelCache:
    """The last ``size`` models asked for, loaded by ``loader(spec, adapter)`` on first use."""

    def __init__(self, size: int, loader: Loader | None = None):
        self.size = size
        self.loader = loader or load_hf
        self._models: collections.OrderedDict[tuple[str, str | None], ChatModel] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: str, adapter: Path | None) -> ChatModel:
        key = (spec, str(adapter) if adapter else None)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = self.loader(spec, adapter)
            self._models[key] = loaded
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return loaded


class PromptTooLong(ValueError):
    pass


class ChatUnavailable(RuntimeError):
    """The server cannot generate with this model now (a 503 for the caller; the cause is in the log)."""


def checked_prompt_tokens(tokenizer: Any, messages: list[dict], limit: int) -> int:
    """The rendered prompt's length in tokens; PromptTooLong above ``limit``."""
    from emguard.data.chat_template import render_chat

    prompt = render_chat(tokenizer, messages, generation_prompt=True)
    tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokens > limit:
        raise PromptTooLong(f"the conversation has {tokens} tokens; the limit is {limit}")
    return tokens


def complete(
    model: ChatModel, messages: list[dict], *, max_prompt_tokens: int, **sampling: Any
) -> tuple[list[tuple[str, str]], int, int]:
    """([(answer, finish_reason)] * n, prompt tokens, completion tokens); ``sampling``: n, max_tokens,
    temperature, top_p, seed."""
    prompt_tokens = checked_prompt_tokens(model.tokenizer, messages, max_prompt_tokens)
    choices, completion_tokens = model.complete(messages, **sampling)
    return choices, prompt_tokens, completion_tokens


def stream(
    model: ChatModel, messages: list[dict], *, max_prompt_tokens: int, **sampling: Any
) -> Iterator[str | Finished]:
    """One answer's text as it is generated, then its ``Finished``; the prompt is checked first."""
    checked_prompt_tokens(model.tokenizer, messages, max_prompt_tokens)
    yield from model.stream(messages, **sampling)


class HFChat:
    """A transformers model (with its adapter attached) generating through emguard's HF generator,
    one request at a time."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.lock = threading.Lock()

    def complete(
        self, messages: list[dict], *, n: int, max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> tuple[list[tuple[str, str]], int]:
        from emguard.evaluation.generation import HFGenerator, SamplingConfig

        sampling = SamplingConfig(
            temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, batch_size=n, seed=seed
        )
        with self.lock:
            generator = HFGenerator(self.model, self.tokenizer, sampling)
            answers = generator.generate([messages] * n)
        stats = generator.stats
        if stats.truncated in (0, n):  # all ended, or all were cut: no guessing which
            reasons = ["length" if stats.truncated else "stop"] * n
        else:  # a decoded answer re-tokenises to about its length; the longest were cut
            lengths = [len(self.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
            cut = set(sorted(range(n), key=lambda i: -lengths[i])[: stats.truncated])
            reasons = ["length" if i in cut else "stop" for i in range(n)]
        return list(zip(answers, reasons, strict=True)), stats.generated_tokens

    def stream(
        self, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Iterator[str | Finished]:
        """The model is held until the answer ends."""
        from transformers import TextIteratorStreamer

        from emguard.evaluation.generation import HFGenerator, SamplingConfig

        sampling = SamplingConfig(
            temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, batch_size=1, seed=seed
        )
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        with self.lock:
            generator = HFGenerator(self.model, self.tokenizer, sampling)
            worker = threading.Thread(target=generator.generate, args=([messages],), kwargs={"streamer": streamer})
            worker.start()
            try:
                yield from (text for text in streamer if text)
            finally:
                worker.join()
        yield Finished("length" if generator.stats.truncated else "stop")


def load_hf(spec: str, adapter: Path | None) -> HFChat:
    from emguard.evaluation.generation import attach_adapter
    from emguard.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(spec)
    tokenizer, model = load_tokenizer(resolved), load_model(resolved)
    if adapter is not None:
        model = attach_adapter(model, adapter)
    return HFChat(model.eval(), tokenizer)
