"""Preventive steering: the exact shift at the steered block, its propagation, training-only
activation and hook removal in every exit path."""

from __future__ import annotations

import contextlib
from typing import ClassVar, Literal

import pytest
import torch
from safetensors.torch import save_file

from conftest import forward_hook_count, tiny_run_config
from emguard.blocks import capture_block_outputs, decoder_blocks, with_block_hidden
from emguard.config import DefenseConfig
from emguard.defenses.base import Defense
from emguard.defenses.registry import register, unregister
from emguard.errors import ConfigError
from emguard.training import train
from step_harness import Harness

HIDDEN, BLOCKS = 32, 2


@pytest.fixture
def vector_file(tmp_path):
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "evil.safetensors"
    save_file({"evil": v}, str(path))
    return path, v


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def test_steered_block_output_is_shifted_by_alpha_v_and_the_shift_propagates(tmp_path, tiny_model_dir, vector_file):
    path, v = vector_file
    h = Harness(tmp_path, tiny_model_dir, [{"name": "steering", "vector": str(path), "layer": 0, "alpha": 3.0}])
    steering, model, blocks = h.defenses[0], h.model, decoder_blocks(h.model)
    model.train()  # the tiny model has no dropout, so train mode is deterministic
    with torch.no_grad():
        with capture_block_outputs(blocks, [0, 1]) as plain:
            plain_logits = _forward(model, h.batch).logits
        with steering.hooks(model), capture_block_outputs(blocks, [0, 1]) as steered:
            steered_logits = _forward(model, h.batch).logits
        # independently: feed block 1 the shifted input, without the steering hook
        shift = blocks[1].register_forward_pre_hook(
            lambda m, args, kwargs: ((args[0] + 3.0 * v, *args[1:]), kwargs) if args else None, with_kwargs=True
        )
        try:
            propagated = _forward(model, h.batch).logits
        finally:
            shift.remove()
    torch.testing.assert_close(steered[0] - plain[0], (3.0 * v).expand_as(plain[0]), rtol=0, atol=1e-5)
    assert not torch.allclose(steered[1], plain[1])
    torch.testing.assert_close(steered_logits, propagated, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered_logits, plain_logits)
    assert forward_hook_count(model) == 0


def test_steering_acts_inside_its_hooks_only(tmp_path, tiny_model_dir, vector_file):
    path, _ = vector_file
    h = Harness(tmp_path, tiny_model_dir, [{"name": "steering", "vector": str(path), "layer": -1}])
    assert h.defenses[0].layer == BLOCKS - 1
    model = h.model
    with torch.no_grad():
        model.eval()
        plain = _forward(model, h.batch).logits
        with h.defenses[0].hooks(model):
            steered = _forward(model, h.batch).logits  # eval mode inside the hooks: steered too
        after = _forward(model, h.batch).logits
    assert not torch.allclose(steered, plain)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)
    h.step()
    assert forward_hook_count(model) == 0


@pytest.mark.parametrize("regulariser", ["kl", "ldifs"])
def test_with_kl_or_ldifs_the_reference_is_steered_too_so_the_terms_do_not_fight_it(
    tmp_path, tiny_model_dir, vector_file, regulariser
):
    # At step 0 the adapter is zero: trained and reference networks differ only if one of them is
    # steered and the other not; then the term's gradient would train the adapter to cancel α·v.
    path, _ = vector_file
    steer = {"name": "steering", "vector": str(path), "layer": 0, "alpha": 3.0}
    h = Harness(tmp_path, tiny_model_dir, [steer, {"name": regulariser, "lambda": 1.0}])
    logs, with_term = h.step()
    assert logs[f"{regulariser}_loss"] == 0.0
    h.defenses[1].config.lambda_ = 0.0
    _, without_term = h.step()
    for name, grad in with_term.items():
        assert (grad - without_term[name]).abs().max() <= 1e-6 * grad.abs().max(), name
    assert forward_hook_count(h.model) == 0


class HookCountConfig(DefenseConfig):
    name: Literal["hookcount"] = "hookcount"
    fail: bool = False


class HookCount(Defense):
    """Records how many forward hooks are on the model during the loss and at finalize."""

    name = "hookcount"
    config_class = HookCountConfig
    seen: ClassVar[list] = []

    def loss(self, batch, outputs, ctx):
        self.seen.append(("loss", forward_hook_count(ctx.model)))
        if self.config.fail:
            raise RuntimeError("boom")
        return outputs.logits.sum() * 0, {}

    def finalize(self, model):
        self.seen.append(("finalize", forward_hook_count(model)))


@pytest.fixture
def hookcount():
    register(HookCount)
    HookCount.seen.clear()
    yield HookCount
    unregister("hookcount")


@pytest.mark.parametrize("fail", [False, True])
def test_no_hook_survives_training_saving_or_an_exception(tmp_path, tiny_model_dir, vector_file, hookcount, fail):
    path, _ = vector_file
    defenses = [{"name": "steering", "vector": str(path), "layer": 0}, {"name": "hookcount", "fail": fail}]
    config = tiny_run_config(tmp_path / "run", tiny_model_dir, defenses=defenses, max_steps=2)
    with pytest.raises(RuntimeError, match="boom") if fail else contextlib.nullcontext():
        train(config, progress=False)
    assert hookcount.seen[0] == ("loss", 1)  # the steering hook is on during training forwards
    if not fail:
        assert hookcount.seen[-1] == ("finalize", 0)  # and gone before finalize and saving


def test_hook_is_removed_when_the_step_raises(tmp_path, tiny_model_dir, vector_file):
    path, _ = vector_file
    h = Harness(tmp_path, tiny_model_dir, [{"name": "steering", "vector": str(path), "layer": 0}])
    with pytest.raises(ValueError, match="inside"), h.defenses[0].hooks(h.model):
        assert forward_hook_count(h.model) == 1
        raise ValueError("inside")
    assert forward_hook_count(h.model) == 0


def test_vector_files_in_every_documented_layout(tmp_path, tiny_model_dir):
    v = torch.arange(HIDDEN, dtype=torch.float32)
    stack = torch.stack([v * 0, v * 1])  # [blocks, hidden]: row ℓ = block ℓ
    with_embeddings = torch.stack([v * 9, v * 0, v * 1])  # [blocks + 1, hidden]: row ℓ + 1 = block ℓ
    for name, tensors in {"flat": {"v": v}, "stack": {"v": stack}, "emb": {"v": with_embeddings}}.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        h = Harness(
            tmp_path,
            tiny_model_dir,
            [{"name": "steering", "vector": str(tmp_path / f"{name}.safetensors"), "layer": 1}],
        )
        torch.testing.assert_close(h.defenses[0].vector, v)

    save_file({"a": v, "b": v.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConfigError, match="holds 2 tensors .* set steering.key"):
        Harness(
            tmp_path, tiny_model_dir, [{"name": "steering", "vector": str(tmp_path / "two.safetensors"), "layer": 0}]
        )
    h = Harness(
        tmp_path,
        tiny_model_dir,
        [{"name": "steering", "vector": str(tmp_path / "two.safetensors"), "layer": 0, "key": "b"}],
    )
    assert h.defenses[0].vector.shape == (HIDDEN,)
    save_file({"v": torch.zeros(HIDDEN + 1)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ConfigError, match=r"has shape \(33,\); expected \(32,\)"):
        Harness(
            tmp_path, tiny_model_dir, [{"name": "steering", "vector": str(tmp_path / "wide.safetensors"), "layer": 0}]
        )
    with pytest.raises(ConfigError, match="no such file"):
        Harness(
            tmp_path,
            tiny_model_dir,
            [{"name": "steering", "vector": str(tmp_path / "missing.safetensors"), "layer": 0}],
        )
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        Harness(
            tmp_path, tiny_model_dir, [{"name": "steering", "vector": str(tmp_path / "junk.safetensors"), "layer": 0}]
        )
    with pytest.raises(ConfigError, match="layer 5 does not exist"):
        Harness(
            tmp_path, tiny_model_dir, [{"name": "steering", "vector": str(tmp_path / "flat.safetensors"), "layer": 5}]
        )


def test_tuple_block_outputs_of_transformers_4_are_handled():
    hidden, extra = torch.zeros(1, 2, 3), torch.ones(1)
    out = with_block_hidden((hidden, extra), hidden + 1)
    assert isinstance(out, tuple) and torch.equal(out[0], hidden + 1) and out[1] is extra
    assert torch.equal(with_block_hidden(hidden, hidden + 2), hidden + 2)
