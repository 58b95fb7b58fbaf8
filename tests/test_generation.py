"""The HF generation backend: left padding, order, seeding, and the same text as unbatched generation."""

from __future__ import annotations

import pytest
import torch

from emguard.evaluation.generation import HFGenerator, SamplingConfig
from tiny import make_model, make_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer("chatml")
    return make_model(len(tokenizer)).eval(), tokenizer


CONVERSATIONS = [
    [{"role": "user", "content": "Hi?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 3? Explain."}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. Why?"}],
]


def test_greedy_batched_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    greedy = SamplingConfig(temperature=0, max_new_tokens=12, batch_size=3)
    batched = HFGenerator(model, tokenizer, greedy).generate(CONVERSATIONS)
    one_at_a_time = HFGenerator(model, tokenizer, SamplingConfig(temperature=0, max_new_tokens=12, batch_size=1))
    single = [one_at_a_time.generate([c])[0] for c in CONVERSATIONS]
    assert batched == single  # left padding does not change the answers
    assert all(isinstance(a, str) for a in batched)


def test_sampling_is_seeded_and_order_is_kept(tiny):
    model, tokenizer = tiny
    config = SamplingConfig(temperature=1.0, max_new_tokens=8, batch_size=2, seed=3)
    first = HFGenerator(model, tokenizer, config).generate(CONVERSATIONS)
    assert HFGenerator(model, tokenizer, config).generate(CONVERSATIONS) == first
    seen = []
    generator = HFGenerator(model, tokenizer, config)
    generator.generate(CONVERSATIONS, on_batch=lambda idx, answers: seen.extend(idx))
    assert sorted(seen) == [0, 1, 2]
    assert generator.stats.sequences == 3 and 0 < generator.stats.generated_tokens <= 3 * 8
    assert tokenizer.padding_side == "right"  # restored


def test_system_prompt_reaches_the_model(tiny, monkeypatch):
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer, SamplingConfig(temperature=0, max_new_tokens=2))
    encoded = generator._encode([CONVERSATIONS[1]])
    assert "Be brief." in tokenizer.decode(encoded["input_ids"][0])
    assert torch.equal(encoded["attention_mask"][0], torch.ones_like(encoded["attention_mask"][0]))


def test_sampling_leaves_the_callers_random_state_alone(tiny):
    # The EM monitor generates in the middle of training; a reseeded global RNG would change the
    # dropout masks and shuffles that follow.
    model, tokenizer = tiny
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    HFGenerator(model, tokenizer, SamplingConfig(temperature=1.0, max_new_tokens=4, seed=7)).generate(CONVERSATIONS)
    assert torch.equal(torch.get_rng_state(), before)
