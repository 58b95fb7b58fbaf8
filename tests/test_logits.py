"""The output head at selected positions equals slicing the full logits, or is not used."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import emguard.defense_passes
from conftest import tiny_run_config
from emguard.logits import logits_at, output_head, selection_is_exact
from emguard.training import train


def test_selected_logits_equal_the_full_logits_at_those_positions(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    positions = torch.zeros(3, 9, dtype=torch.bool)
    positions[0, 2:5] = positions[2, 7] = True
    head = output_head(model)
    with torch.no_grad():
        full = model(ids).logits
        with logits_at(head, positions):
            selected = model(ids).logits
        after = model(ids).logits
    assert selected.shape == (4, model.config.vocab_size)
    torch.testing.assert_close(selected, full[positions])
    torch.testing.assert_close(after, full)  # the hook is gone after the block
    assert not head._forward_pre_hooks
    assert selection_is_exact(model, head)


class ReshapingLM(torch.nn.Module):
    """A model whose forward reshapes the head's output, so the selection cannot be used."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 4)
        self.head = torch.nn.Linear(4, 11)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        b, t = input_ids.shape
        logits = self.head(self.embed(input_ids)).view(b, t, -1)
        return type("Out", (), {"logits": logits})()


def test_models_that_reshape_logits_are_detected():
    model = ReshapingLM()
    assert not selection_is_exact(model, model.head)
    assert not model.head._forward_pre_hooks


def test_trainer_falls_back_to_full_logits_with_the_same_losses(tmp_path, tiny_model_dir, monkeypatch):
    def losses(run_dir):
        lines = (run_dir / "train_log.jsonl").read_text().splitlines()
        return [r["sft_loss"] for r in map(json.loads, lines) if "sft_loss" in r]

    fast = train(tiny_run_config(tmp_path / "fast", tiny_model_dir, learning_rate=1e-2), progress=False)
    monkeypatch.setattr(emguard.defense_passes, "selection_is_exact", lambda *a: False)
    slow = train(tiny_run_config(tmp_path / "slow", tiny_model_dir, learning_rate=1e-2), progress=False)
    assert losses(slow.run_dir) == pytest.approx(losses(fast.run_dir), rel=1e-5, abs=1e-7)
