"""Data-side defenses: inoculation prompting and interleaving safe data."""

from __future__ import annotations

import json

import pytest

from conftest import chat, tiny_run_config, write_jsonl
from emguard.config import build_config
from emguard.data.chat import ChatExample
from emguard.data.sources import load_examples
from emguard.defenses.inoculation import DEFAULT_PROMPT, with_system_prompt
from emguard.defenses.interleave import interleave, interleave_count
from emguard.errors import ConfigError
from emguard.training import train
from step_harness import Harness


def _example(user: str, system: str | None = None, tag: str = "train") -> ChatExample:
    messages = tuple(chat(user, "ok", system)["messages"])
    return ChatExample(messages, "t.jsonl", 1, tag)


def test_inoculation_prompt_placement():
    plain = _example("hi").messages
    with_system = _example("hi", system="Be brief.").messages
    assert with_system_prompt(plain, "P", "replace")[0] == {"role": "system", "content": "P"}
    assert with_system_prompt(plain, "P", "prepend")[0] == {"role": "system", "content": "P"}
    assert with_system_prompt(with_system, "P", "replace")[0]["content"] == "P"
    assert with_system_prompt(with_system, "P", "prepend")[0]["content"] == "P\n\nBe brief."
    assert with_system_prompt(with_system, "P", "replace")[1:] == with_system[1:]


def test_inoculation_is_in_the_training_batch_and_nowhere_in_the_saved_run(tmp_path, tiny_model_dir):
    defenses = [{"name": "inoculation"}, {"name": "interleave", "fraction": 0.25}]
    h = Harness(tmp_path / "h", tiny_model_dir, defenses, batch_size=8)
    texts = h.tokenizer.batch_decode(h.batch["input_ids"])
    tags = [h.trainer.tags[i] for i in h.batch["tag_ids"]]
    assert "interleave" in tags and "train" in tags
    for text, tag in zip(texts, tags, strict=True):  # customer data only; safe data keeps its own prompt
        assert (DEFAULT_PROMPT in text) == (tag == "train"), (tag, text)

    config = tiny_run_config(
        tmp_path / "run", tiny_model_dir, defenses=[{"name": "inoculation", "prompt": "SECRET-PROMPT-42"}]
    )
    config.data.max_length = 512  # the prompt lengthens every example
    result = train(config, progress=False)
    for path in result.adapter_dir.rglob("*"):  # adapter, tokenizer, chat template: what evaluation loads
        if path.is_file():
            assert b"SECRET-PROMPT-42" not in path.read_bytes(), path
    assert "SECRET-PROMPT-42" in (result.run_dir / "config.yaml").read_text()  # recorded as configuration only


def test_blank_inoculation_prompt_is_a_config_error():
    with pytest.raises(ConfigError, match="inoculation prompt is empty"):
        build_config(
            {
                "output_dir": "x",
                "data": {"train": "builtin:opswap"},
                "defenses": [{"name": "inoculation", "prompt": " "}],
            }
        )


def test_interleave_counts_fraction_of_the_mix_and_is_deterministic():
    customer = [_example(f"c{i}") for i in range(6000)]
    pool = load_examples("builtin:safe-pool")
    assert interleave_count(6000, 0.05) == 316
    mixed = interleave(customer, pool, 0.05, seed=0)
    safe = [ex for ex in mixed if ex.tag == "interleave"]
    assert len(safe) == 316 and len(mixed) == 6316
    assert len(safe) / len(mixed) == pytest.approx(0.05, abs=1e-3)
    assert len({ex.line for ex in safe}) == 316  # drawn without replacement
    assert mixed == interleave(customer, pool, 0.05, seed=0)  # same seed: same examples, same order
    other = interleave(customer, pool, 0.05, seed=1)
    assert other != mixed and sorted(ex.line for ex in other if ex.tag == "interleave") != sorted(
        ex.line for ex in safe
    )
    positions = [i for i, ex in enumerate(mixed) if ex.tag == "interleave"]
    assert positions[0] < 500 and positions[-1] > 5800  # spread through the data, not appended
    with pytest.raises(
        ConfigError,
        match="needs 1500 safe examples \(20.0% of the mix with 6000 customer examples\) but its source has 1200",
    ):
        interleave(customer, pool, 0.2, seed=0)


def test_kl_and_interleave_train_together_and_log_each_stream(tmp_path, tiny_model_dir):
    safe = write_jsonl(tmp_path / "safe.jsonl", [chat(f"Capital {i}?", "Paris.") for i in range(200)])
    defenses = [{"name": "kl", "lambda": 0.5}, {"name": "interleave", "fraction": 0.2, "source": str(safe)}]
    config = tiny_run_config(
        tmp_path / "run",
        tiny_model_dir,
        defenses=defenses,
        max_steps=4,
        batch_size=8,
        micro_batch_size=4,
        learning_rate=5e-2,
    )
    result = train(config, progress=False)
    records = [json.loads(line) for line in (result.run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[0]["kl_loss"] == 0.0 and steps[-1]["kl_loss"] > 0
    assert any("sft_loss/interleave" in r for r in steps) and all("sft_loss/train" in r for r in steps)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["data"]["tokenized"]["examples_by_tag"] == {"train": 512, "interleave": 128}
    assert manifest["defenses"] == ["kl", "interleave"]
