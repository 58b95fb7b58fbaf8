"""The service's vLLM chat backend, against a stand-in ``vllm`` module (vLLM cannot be installed on
this CPU machine): one engine per base model, every released model its own adapter attached per
request, sampling and finish reasons carried through, the prompt limit checked first."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass, field

import openai
import pytest
from transformers import AutoTokenizer

from emguard.errors import ConfigError
from emguard.service.app import create_app
from emguard.service.policy import Policy
from emguard.service.serving_vllm import chat_backend
from emguard.service.store import StateDir
from service_harness import TINY, jsonl_bytes, running_service, tiny_policy, training_rows


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    outputs: list[Completion]


@dataclass
class FakeVLLM:
    """Records the engines built and the calls made; answers name the adapter they were asked with."""

    engines: list[dict] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)
    fail_to_start: bool = False

    def module(self) -> dict[str, types.ModuleType]:
        fake = self

        class LLM:
            def __init__(self, model: str, **options):
                fake.engines.append({"model": model, **options})
                if fake.fail_to_start:
                    raise RuntimeError("CUDA out of memory")
                self.model = model

            def get_tokenizer(self):
                return AutoTokenizer.from_pretrained(self.model)

            def chat(self, conversations, params, lora_request=None, use_tqdm=True):
                fake.calls.append({"conversations": conversations, "params": params, "lora": lora_request})
                name = lora_request.lora_path if lora_request else "base"
                cut = params.max_tokens < 3
                return [
                    RequestOutput(
                        [
                            Completion(f" {name} #{i} ", [7] * min(params.max_tokens, 3), "length" if cut else "stop")
                            for i in range(params.n)
                        ]
                    )
                    for _ in conversations
                ]

        class SamplingParams:
            def __init__(self, **options):
                if options["temperature"] == 0 and options["n"] > 1:  # as vLLM's own check
                    raise ValueError("n must be 1 when using greedy sampling")
                self.__dict__.update(options)

        @dataclass
        class LoRARequest:
            lora_name: str
            lora_int_id: int
            lora_path: str

        modules = {name: types.ModuleType(name) for name in ("vllm", "vllm.lora", "vllm.lora.request")}
        for name, module in modules.items():
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        modules["vllm"].LLM, modules["vllm"].SamplingParams = LLM, SamplingParams
        modules["vllm.lora.request"].LoRARequest = LoRARequest
        return modules


def test_backend_choice_without_vllm_is_hf_or_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM not importable, whatever is installed
    assert chat_backend("auto") == "hf" and chat_backend("hf") == "hf"
    with pytest.raises(ConfigError, match=r"pip install 'emguard\[vllm\]'.*chat_backend: hf"):
        chat_backend("vllm")


def test_released_models_share_one_vllm_engine_with_their_own_adapters(tmp_path, tiny_model_dir, monkeypatch):
    fake = FakeVLLM()
    for name, module in fake.module().items():
        monkeypatch.setitem(sys.modules, name, module)
    policy = tiny_policy(
        tiny_model_dir, chat_backend="vllm", chat_gpu_memory_utilization=0.3, chat_max_prompt_tokens=64
    )
    with running_service(tmp_path, policy) as svc:
        client = svc.client()
        file_id = client.files.create(file=("t.jsonl", jsonl_bytes(training_rows())), purpose="fine-tune").id
        jobs = [client.fine_tuning.jobs.create(training_file=file_id, model=TINY, suffix=s) for s in ("a", "b")]
        models = [svc.wait(client, j.id).fine_tuned_model for j in jobs]
        question = [{"role": "user", "content": "What is 2 plus 2?"}]

        replies = [client.chat.completions.create(model=m, messages=question, n=2, seed=5) for m in models]
        again = client.chat.completions.create(model=models[0], messages=question, max_tokens=2, temperature=0)
        greedy = client.chat.completions.create(model=models[0], messages=question, temperature=0, n=3)
        base = client.chat.completions.create(model=TINY, messages=question)
        streamed = list(client.chat.completions.create(model=models[1], messages=question, stream=True))
        with pytest.raises(openai.BadRequestError) as too_long:
            client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "word " * 200}])

    assert len(fake.engines) == 1  # one engine for the base model, adapters attached per request
    engine = fake.engines[0]
    assert engine["model"] == str(tiny_model_dir) and engine["enable_lora"] is True
    assert engine["max_lora_rank"] == 8 and engine["gpu_memory_utilization"] == 0.3  # tiny lora r=4 -> 8
    assert engine["max_model_len"] == 64 + 16  # chat_max_prompt_tokens + chat_max_tokens
    adapters = [str(StateDir(svc.state).run_dir(j.id) / "adapter") for j in jobs]
    for adapter, reply in zip(adapters, replies, strict=True):
        assert [c.message.content for c in reply.choices] == [f"{adapter} #0", f"{adapter} #1"]
        assert [c.finish_reason for c in reply.choices] == ["stop", "stop"] and reply.usage.completion_tokens == 6
    loras = [call["lora"] for call in fake.calls]
    assert [lora.lora_int_id if lora else None for lora in loras] == [1, 2, 1, 1, None, 2]  # stable ids per adapter
    first = fake.calls[0]["params"]
    assert (first.n, first.seed, first.temperature) == (2, 5, 1.0) and first.stop_token_ids
    assert again.choices[0].finish_reason == "length" and fake.calls[2]["params"].max_tokens == 2
    assert [c.message.content for c in greedy.choices] == [f"{adapters[0]} #0"] * 3  # greedy: one answer, n copies
    assert greedy.usage.completion_tokens == 3 * 3
    assert base.choices[0].message.content == "base #0"
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == f"{adapters[1]} #0" and streamed[-1].choices[0].finish_reason == "stop"
    assert too_long.value.code == "context_length_exceeded" and len(fake.calls) == 6  # refused before vLLM ran


def test_an_engine_that_cannot_start_is_a_503_once_and_a_rank_vllm_refuses_stops_the_start(
    tmp_path, tiny_model_dir, monkeypatch
):
    fake = FakeVLLM(fail_to_start=True)
    for name, module in fake.module().items():
        monkeypatch.setitem(sys.modules, name, module)
    with running_service(tmp_path, tiny_policy(tiny_model_dir, chat_backend="vllm"), workers=0) as svc:
        client = svc.client()
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as error:
                client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}])
            assert error.value.status_code == 503 and error.value.code == "model_unavailable"
            assert "RuntimeError" in error.value.message and str(tmp_path) not in error.value.message
    assert len(fake.engines) == 1  # not rebuilt on every request
    policy = Policy.model_validate(tiny_policy(tiny_model_dir, chat_backend="vllm", lora={"r": 1024}))
    with pytest.raises(ConfigError, match="lora.r is 1024; vLLM serves LoRA ranks up to 512"):
        create_app(tmp_path / "other", policy)
