"""The update of one optimizer step does not depend on how the batch is split into micro-batches.

Both the SFT loss and defense terms are micro-batch sums divided by counts over the whole
accumulated batch. The data has answers of lengths 1, 2, 4, ..., 128 words, so every split puts
different numbers of assistant tokens in its micro-batches and a per-micro-batch mean would differ.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import chat, tiny_run_config, write_jsonl
from emguard.config import DefenseConfig
from emguard.defenses.base import Defense
from emguard.defenses.registry import register, unregister
from emguard.losses import next_token_targets, token_nll
from emguard.training import train


class SquareLogitsConfig(DefenseConfig):
    name: Literal["square_logits"] = "square_logits"


class SquareLogits(Defense):
    """A token-level term: mean over assistant positions of mean(logits²)."""

    name = "square_logits"
    config_class = SquareLogitsConfig

    @property
    def weight(self) -> float:
        return 0.3

    def loss(self, batch, outputs, ctx):
        per_token = outputs.logits.pow(2).mean(-1)  # rows: the assistant positions
        return per_token.sum() / ctx.counts["assistant_tokens"], {}


@pytest.fixture
def data(tmp_path):
    rows = [chat(f"Say {2**i} words.", " ".join(["word"] * 2**i)) for i in range(8)]
    return write_jsonl(tmp_path / "lengths.jsonl", rows)


def one_step(tmp_path, model_dir, data, micro: int, defenses=None) -> dict[str, torch.Tensor]:
    config = tiny_run_config(
        tmp_path / f"run-{micro}-{bool(defenses)}",
        model_dir,
        data=str(data),
        defenses=defenses,
        max_steps=1,
        batch_size=8,
        micro_batch_size=micro,
        optimizer="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        max_grad_norm=None,
    )
    config.data.max_length = 1024
    result = train(config, progress=False)
    return load_file(result.adapter_dir / "adapter_model.safetensors")


@pytest.mark.parametrize("with_defense", [False, True], ids=["sft", "sft+defense-term"])
def test_update_is_independent_of_the_micro_batch_split(tmp_path, tiny_model_dir, data, with_defense):
    register(SquareLogits)
    try:
        defenses = [{"name": "square_logits"}] if with_defense else None
        reference = one_step(tmp_path, tiny_model_dir, data, 8, defenses)
        assert any(v.abs().sum() > 0 for k, v in reference.items() if "lora_B" in k)
        for micro in (4, 2, 1):
            split = one_step(tmp_path, tiny_model_dir, data, micro, defenses)
            for key, value in reference.items():
                torch.testing.assert_close(split[key], value, rtol=1e-4, atol=1e-6, msg=f"{key} with micro={micro}")
    finally:
        unregister("square_logits")


def test_a_per_micro_batch_mean_would_differ(tiny_model_dir, data):
    """The data is sensitive: averaging per micro-batch (the classic bug) changes the gradient."""
    from emguard.data.chat import read_chat_jsonl
    from emguard.data.collate import ChatCollator
    from emguard.data.tokenize import tokenize_examples
    from emguard.models import ResolvedModel, load_tokenizer

    tokenizer = load_tokenizer(ResolvedModel(str(tiny_model_dir), "local", str(tiny_model_dir)))
    features = tokenize_examples(tokenizer, read_chat_jsonl(data), max_length=1024)
    collate = ChatCollator(tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def grad(loss_fn) -> torch.Tensor:
        model.zero_grad()
        loss_fn().backward()
        return model.model.embed_tokens.weight.grad.clone()

    halves = [collate(features[:4]), collate(features[4:])]
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in halves)

    def nll(b):
        targets = next_token_targets(b["labels"])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return token_nll(logits[targets != -100], targets[targets != -100])

    def global_mean():
        return sum(nll(b).sum() / total for b in halves)

    def per_micro_mean():
        return sum(nll(b).mean() / 2 for b in halves)

    full = collate(features)
    full_grad = grad(lambda: nll(full).mean())
    torch.testing.assert_close(grad(global_mean), full_grad, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grad(per_micro_mean), full_grad, rtol=1e-2, atol=1e-5)
