"""The defense interface, driven through the real trainer by a test defense that records its calls."""

from __future__ import annotations

import contextlib
import gc
from typing import ClassVar, Literal

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from conftest import forward_hook_count, tiny_run_config
from emguard.config import DefenseConfig, build_config
from emguard.data.chat import ChatExample
from emguard.defenses.base import Defense
from emguard.defenses.registry import build_defenses, register, unregister
from emguard.errors import ConfigError
from emguard.training import train


class ProbeConfig(DefenseConfig):
    name: Literal["probe"] = "probe"
    weight: float = 0.5
    fail_at_step: int | None = None


class ProbeDefense(Defense):
    """Records every hook call; its loss term pulls the logits toward the reference model's."""

    name = "probe"
    config_class = ProbeConfig
    needs_reference = True
    feature_layers = (0, 1)
    events: ClassVar[list] = []
    observed: ClassVar[list] = []

    @property
    def weight(self) -> float:
        return self.config.weight

    def prepare(self, ctx):
        self.events.append(("prepare", type(ctx.model).__name__))

    def transform_dataset(self, examples):
        self.events.append(("transform", len(examples)))
        extra = ChatExample(
            ({"role": "user", "content": "Mixed in?"}, {"role": "assistant", "content": "Yes."}),
            "probe",
            1,
            tag="probe",
        )
        return [*examples, extra, extra]

    @contextlib.contextmanager
    def hooks(self, model):
        layer = model.get_base_model().model.layers[0]
        handle = layer.register_forward_hook(lambda *_: self.events.append(("hooked-forward",)))
        self.events.append(("hooks-enter",))
        try:
            yield
        finally:
            handle.remove()
            self.events.append(("hooks-exit",))

    def loss(self, batch, outputs, ctx):
        if self.config.fail_at_step is not None and ctx.step >= self.config.fail_at_step:
            raise RuntimeError("probe failure")
        models_alive = sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())
        self.observed.append(
            {
                "step": ctx.step,
                "models_alive": models_alive,
                "input_ids": batch["input_ids"].cpu(),
                "attention_mask": batch["attention_mask"].cpu(),
                "reference_logits": ctx.reference.logits.cpu(),
                "positions": ctx.positions.cpu(),
                "n_hidden": len(outputs.features),
                "n_ref_hidden": len(ctx.reference.features),
                "hooks_during_loss": forward_hook_count(ctx.model),
            }
        )
        diff = (outputs.logits - ctx.reference.logits).pow(2).sum(-1).sum()
        return diff / ctx.counts["assistant_tokens"], {"rows": float(ctx.positions.sum())}

    def finalize(self, model):
        self.events.append(("finalize", forward_hook_count(model)))


@pytest.fixture
def probe():
    register(ProbeDefense)
    ProbeDefense.events.clear()
    ProbeDefense.observed.clear()
    yield ProbeDefense
    unregister("probe")


def test_hooks_are_called_in_order_and_removed(tmp_path, tiny_model_dir, probe):
    config = tiny_run_config(
        tmp_path / "run", tiny_model_dir, defenses=[{"name": "probe"}], max_steps=2, batch_size=4, micro_batch_size=2
    )
    train(config, progress=False)
    names = [e[0] for e in probe.events]
    assert names[:2] == ["prepare", "transform"] and probe.events[0][1] == "PeftModelForCausalLM"
    assert names[-1] == "finalize" and probe.events[-1][1] == 0  # no hook left before finalize/saving
    steps = names[2:-1]
    # 2 optimizer steps x 2 micro-batches: hooks wrap the reference pass, the forward and the backward
    # of each micro-batch (a regulariser compares the two networks under the same interventions).
    assert steps == ["hooks-enter", "hooked-forward", "hooked-forward", "hooks-exit"] * 4


def test_reference_is_the_adapter_disabled_model_without_a_second_copy(tmp_path, tiny_model_dir, probe):
    config = tiny_run_config(
        tmp_path / "run", tiny_model_dir, defenses=[{"name": "probe"}], max_steps=3, learning_rate=5e-2
    )
    train(config, progress=False)
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert len(probe.observed) == 6
    for seen in probe.observed:
        assert seen["models_alive"] == 1  # the trained model only: the reference is not a copy
        assert seen["n_hidden"] == seen["n_ref_hidden"] == base.config.num_hidden_layers
        assert seen["hooks_during_loss"] == 1  # the probe's own hook
        with torch.no_grad():
            expected = base(input_ids=seen["input_ids"], attention_mask=seen["attention_mask"]).logits
        # The reference logits are those of the assistant-token predictions (the rows SFT needs).
        positions = seen["positions"]
        torch.testing.assert_close(seen["reference_logits"], expected[positions], rtol=1e-5, atol=1e-5)


def test_defense_term_and_mixed_data_are_logged_separately(tmp_path, tiny_model_dir, probe):
    config = tiny_run_config(
        tmp_path / "run", tiny_model_dir, defenses=[{"name": "probe"}], max_steps=3, learning_rate=5e-2
    )
    result = train(config, progress=False)
    logs = [r for r in (result.run_dir / "train_log.jsonl").read_text().splitlines() if '"loss"' in r]
    import json

    records = [json.loads(r) for r in logs]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["probe_loss"] == 0.0  # the adapter starts at zero: trained == reference
    assert records[-1]["probe_loss"] > 0.0
    for r in records:
        assert r["loss"] == pytest.approx(r["sft_loss"] + 0.5 * r["probe_loss"], rel=1e-4, abs=1e-6)
        assert "probe/rows" in r
    assert any("sft_loss/probe" in r for r in records) or any("sft_loss/train" in r for r in records)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["data"]["tokenized"]["examples_by_tag"] == {"train": 512, "probe": 2}
    assert manifest["defenses"] == ["probe"]


def test_hooks_are_removed_when_training_fails(tmp_path, tiny_model_dir, probe):
    config = tiny_run_config(tmp_path / "run", tiny_model_dir, defenses=[{"name": "probe", "fail_at_step": 1}])
    with pytest.raises(RuntimeError, match="probe failure"):
        train(config, progress=False)
    names = [e[0] for e in probe.events]
    assert names.count("hooks-enter") == names.count("hooks-exit") > 0
    assert not (tmp_path / "run" / "adapter").exists()
    assert '"status": "running"' in (tmp_path / "run" / "manifest.json").read_text()


def test_incompatible_and_duplicate_defenses_are_config_errors(probe):
    class Other(Defense):
        name = "other"
        config_class = type(
            "OtherConfig", (DefenseConfig,), {"__annotations__": {"name": Literal["other"]}, "name": "other"}
        )
        incompatible_with: ClassVar = {"probe": "both rewrite the system prompt"}

    register(Other)
    try:
        base = {"output_dir": "x", "data": {"train": "builtin:opswap"}}
        with pytest.raises(ConfigError, match="other cannot be combined with probe: both rewrite the system prompt"):
            build_defenses(build_config({**base, "defenses": [{"name": "probe"}, {"name": "other"}]}).defenses)
        with pytest.raises(ConfigError, match="probe listed more than once"):
            build_defenses(build_config({**base, "defenses": [{"name": "probe"}, {"name": "probe"}]}).defenses)
        with pytest.raises(ConfigError, match="'none' means no defense"):
            build_defenses(build_config({**base, "defenses": [{"name": "none"}, {"name": "probe"}]}).defenses)
        assert build_defenses(build_config({**base, "defenses": [{"name": "none"}]}).defenses) == []
    finally:
        unregister("other")


def test_adapter_weights_change_and_are_saved_as_safetensors(tmp_path, tiny_model_dir):
    config = tiny_run_config(tmp_path / "run", tiny_model_dir, learning_rate=5e-2)
    result = train(config, progress=False)
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero; training moved it
