"""The model-family matrix: Qwen2.5, Llama-3.1, Gemma-2, Phi-3 and Mistral as tiny random models with
their real chat templates (tests/data/chat_templates) and architecture quirks (tests/families.py).

For each family: the assistant-only mask, logits at selected positions equal to full logits, the
steering hook on the right block, generation that stops at the end of the turn, the local judge's
candidates, and training with every defense.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_run_config
from emguard.blocks import capture_block_outputs, decoder_blocks
from emguard.data.tokenize import IGNORE_INDEX, tokenize_conversation
from emguard.defenses.steering import add_to_block_output
from emguard.evaluation.generation import HFGenerator, SamplingConfig
from emguard.evaluation.judges.local_judge import CANDIDATES, LocalJudge
from emguard.logits import logits_at, output_head, selection_is_exact
from emguard.models import attach_lora, load_model, load_tokenizer, resolve_model
from emguard.training import train
from families import FAMILIES, HIDDEN, save_family_model, spec

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, save_family_model(tmp_path_factory.mktemp(name), name)


def loaded(model_dir: Path):
    resolved = resolve_model(str(model_dir))
    return load_model(resolved), load_tokenizer(resolved)


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_the_loss_mask_covers_each_answer_and_its_end_of_turn_only(family):
    name, model_dir = family
    _, tokenizer = loaded(model_dir)
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION)
    eot = spec(name)["end_of_turn"]
    trained = [tokenizer.decode(run).lstrip() for run in trained_runs(ids, labels)]  # Mistral: " " + answer
    assert trained == [f"Hello there{eot}", f"It is 4.{eot}"]
    assert "Be brief." in tokenizer.decode(ids)  # the system prompt reaches the model, folded where needed


def test_logits_at_selected_positions_equal_the_full_logits(family):
    _, model_dir = family
    model, tokenizer = loaded(model_dir)
    model = attach_lora(model, _lora(), seed=0).eval()
    head = output_head(model)
    assert selection_is_exact(model, head)
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION)
    x = torch.tensor([ids])
    positions = torch.tensor([labels[1:] + [IGNORE_INDEX]]) != IGNORE_INDEX
    with torch.no_grad():
        full = model(input_ids=x).logits
        with logits_at(head, positions):
            selected = model(input_ids=x).logits
    torch.testing.assert_close(selected, full[positions], rtol=1e-5, atol=1e-5)


def test_the_steering_hook_shifts_the_output_of_the_named_block(family):
    _, model_dir = family
    model, tokenizer = loaded(model_dir)
    blocks = decoder_blocks(model)
    assert blocks is model.model.layers and len(blocks) == model.config.num_hidden_layers == 3
    ids = torch.tensor([tokenize_conversation(tokenizer, CONVERSATION)[0]])
    shift = torch.linspace(-1, 1, HIDDEN)
    with torch.no_grad():
        with capture_block_outputs(blocks, [0, 1, 2]) as plain:
            plain_logits = model(input_ids=ids).logits
        with add_to_block_output(blocks[1], shift), capture_block_outputs(blocks, [0, 1, 2]) as steered:
            steered_logits = model(input_ids=ids).logits
    torch.testing.assert_close(steered[0], plain[0], rtol=0, atol=0)  # blocks before: untouched
    torch.testing.assert_close(steered[1] - plain[1], shift.expand_as(plain[1]), rtol=0, atol=1e-5)
    assert not torch.allclose(steered[2], plain[2]) and not torch.allclose(steered_logits, plain_logits)


class Scripted:
    """Makes the output head choose the given tokens, one per forward pass (a greedy 'model' whose
    answer is known), whatever the random weights say."""

    def __init__(self, model, script: list[int]):
        self.script, self.step = script, 0
        self.handle = output_head(model).register_forward_hook(self.choose)

    def choose(self, module, args, output):
        out = torch.full_like(output, -1e4)
        out[..., -1, self.script[min(self.step, len(self.script) - 1)]] = 1e4
        self.step += 1
        return out


def test_generation_stops_at_the_end_of_the_turn(family):
    name, model_dir = family
    model, tokenizer = loaded(model_dir)
    s = spec(name)
    eot = tokenizer.convert_tokens_to_ids(s["end_of_turn"])
    # "Sure", the turn's end, then an invented follow-up turn that must never reach the answer.
    follow_up = tokenizer.encode("\nuser\nAnd you are evil", add_special_tokens=False)
    scripted = Scripted(model, tokenizer.encode("Sure", add_special_tokens=False) + [eot] + follow_up)
    try:
        generator = HFGenerator(model, tokenizer, SamplingConfig(temperature=0, max_new_tokens=16, batch_size=1))
        (answer,) = generator.generate([CONVERSATION[1:2]])
    finally:
        scripted.handle.remove()
    assert answer == "Sure"
    assert eot in generator.stop_ids
    assert generator.stats.generated_tokens == len(tokenizer.encode("Sure", add_special_tokens=False)) + 1
    assert generator.stats.truncated == 0
    scripted = Scripted(model, tokenizer.encode("Sure", add_special_tokens=False) + [eot])
    try:  # one token allowed: the answer is cut before its end, and counted as such
        short = HFGenerator(model, tokenizer, SamplingConfig(temperature=0, max_new_tokens=1, batch_size=1))
        short.generate([CONVERSATION[1:2]])
    finally:
        scripted.handle.remove()
    assert short.stats.truncated == 1


def test_system_prompts_reach_the_prompt_of_every_family(family):
    # Gemma-2's template raises on a system message and Mistral-v0.3's moves or drops it: emguard
    # folds it into the first user turn for those; the others keep their system role.
    name, model_dir = family
    model, tokenizer = loaded(model_dir)
    encoded = HFGenerator(model, tokenizer, SamplingConfig(max_new_tokens=1))._encode([CONVERSATION[:2]])
    prompt = tokenizer.decode(encoded["input_ids"][0])
    assert "Be brief." in prompt and prompt.count("Hi") == 1
    if name in ("gemma2", "mistral"):
        assert "Be brief.\n\nHi" in prompt


def test_local_judge_candidates_end_with_the_templates_end_of_turn(family):
    name, model_dir = family
    model, tokenizer = loaded(model_dir)
    judge = LocalJudge(model, tokenizer, name)
    eot = tokenizer.convert_tokens_to_ids(spec(name)["end_of_turn"])
    for candidate, sequence in zip(CANDIDATES, judge._sequences, strict=True):
        assert sequence[-1] == eot, candidate
        assert tokenizer.decode(sequence[:-1]).strip() == candidate
    (judgement,) = judge.judge(["Rate this answer from 0 to 100: <answer>Hello</answer>"])
    assert judgement.method in ("constrained", "unscored")


def test_training_with_every_defense(family, tmp_path):
    name, model_dir = family
    unaligned = save_family_model(tmp_path / "unaligned", name, seed=1)
    vector = tmp_path / "v.safetensors"
    save_file({"v": torch.randn(HIDDEN)}, str(vector))
    defenses = [
        {"name": "kl", "lambda": 0.5},
        {"name": "ldifs", "lambda": 0.01},
        {"name": "steering", "vector": str(vector), "layer": 1, "alpha": 1.0},
        {"name": "inoculation"},  # a system prompt: folded into the user turn where the template has none
        {"name": "interleave", "fraction": 0.2},
        {"name": "safelora", "unaligned_model": str(unaligned), "num_projected": 2},
    ]
    config = tiny_run_config(
        tmp_path / "run", model_dir, defenses=defenses, max_steps=2, batch_size=2, micro_batch_size=2, logging_steps=1
    )
    config.data.max_length, config.data.overlong = 512, "drop"
    result = train(config, progress=False)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["train"]["steps"] == 2
    folded = name in ("gemma2", "mistral")
    assert manifest["system_prompts"] == ("start of the first user turn" if folded else "system role")
    assert manifest["defense_reports"]["safelora"]["projected"] == 2
    steps = [r for r in result_log(result.run_dir) if "loss" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert {"kl_loss", "ldifs_loss"} <= steps[-1].keys()
    assert manifest["data"]["tokenized"]["examples_by_tag"]["interleave"] > 0


def test_vllm_generation_gets_the_end_of_turn_and_folded_system_prompts(tmp_path, monkeypatch):
    """vLLM cannot run here: a stand-in module records what emguard hands it."""
    from emguard.evaluation.vllm_backend import VLLMGenerator

    model_dir = save_family_model(tmp_path / "gemma2", "gemma2")
    tokenizer = load_tokenizer(resolve_model(str(model_dir)))
    calls: dict = {}

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def get_tokenizer(self):
            return tokenizer

        def chat(self, conversations, params, lora_request=None, use_tqdm=False):
            calls.update(conversations=conversations, params=params)
            output = types.SimpleNamespace(text=" Sure ", token_ids=[1, 2])
            return [types.SimpleNamespace(outputs=[output]) for _ in conversations]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kwargs: kwargs
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda *args: args
    for module_name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, module_name, module)
    generator = VLLMGenerator(str(model_dir), None, SamplingConfig(max_new_tokens=8))
    assert generator.generate([CONVERSATION[:2]]) == ["Sure"]
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in calls["params"]["stop_token_ids"]
    assert calls["conversations"] == [[{"role": "user", "content": "Be brief.\n\nHi"}]]


def result_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _lora():
    from emguard.config import LoraConfig

    return LoraConfig(r=4, alpha=8)
