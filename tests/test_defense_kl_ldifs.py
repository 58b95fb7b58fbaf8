"""KL and LDIFS: exact zeros at step 0, values against independent computations, gradients
against finite differences, and the option semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from emguard.config import build_config
from emguard.errors import ConfigError
from emguard.losses import IGNORE_INDEX, next_token_targets, token_kl
from step_harness import Harness


@pytest.mark.parametrize("defense", [{"name": "kl"}, {"name": "kl", "tokens": "all"}, {"name": "ldifs"}])
def test_terms_and_their_gradients_are_exactly_zero_at_step_0_then_positive(tmp_path, tiny_model_dir, defense):
    h = Harness(tmp_path, tiny_model_dir, [defense])
    logs, with_term = h.step()
    key = f"{defense['name']}_loss"
    assert logs[key] == 0.0
    h.defenses[0].config.lambda_ = 0.0
    _, without_term = h.step()
    assert with_term.keys() == without_term.keys() and with_term
    for name, grad in with_term.items():
        if defense["name"] == "ldifs":  # 2 (h_θ − h_ref) = 0 exactly
            assert torch.equal(grad, without_term[name]), name
        else:  # p_θ − p_ref = 0 up to the rounding of Σ softmax = 1 (float32 ulp level)
            assert (grad - without_term[name]).abs().max() <= 1e-6 * grad.abs().max(), name

    h.perturb_lora()  # as after an update
    h.defenses[0].config.lambda_ = 1.0
    logs, with_term = h.step()
    assert logs[key] > 0
    h.defenses[0].config.lambda_ = 0.0
    _, without_term = h.step()
    changed = [n for n in with_term if not torch.allclose(with_term[n], without_term[n], rtol=1e-4, atol=1e-7)]
    assert len(changed) > len(with_term) // 2  # the term's gradient reaches the LoRA weights


def _full_outputs(h: Harness, adapter: bool) -> tuple[torch.Tensor, tuple]:
    h.model.eval()
    with torch.no_grad():
        if adapter:
            out = h.model(**{k: h.batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        else:
            with h.model.disable_adapter():
                out = h.model(**{k: h.batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    h.model.train()
    return out.logits, out.hidden_states


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("tokens", ["assistant", "all"])
def test_kl_value_matches_an_independent_full_logit_computation(tmp_path, tiny_model_dir, direction, tokens):
    h = Harness(tmp_path, tiny_model_dir, [{"name": "kl", "direction": direction, "tokens": tokens, "chunk_rows": 7}])
    h.perturb_lora()
    logs, _ = h.step()
    logits, _ = _full_outputs(h, adapter=True)
    ref, _ = _full_outputs(h, adapter=False)
    log_p, log_r = F.log_softmax(logits, -1), F.log_softmax(ref, -1)
    if direction == "reverse":  # KL(θ‖ref); F.kl_div(input, target) = Σ target (log target − input)
        per_pos = F.kl_div(log_r, log_p, log_target=True, reduction="none").sum(-1)
    else:
        per_pos = F.kl_div(log_p, log_r, log_target=True, reduction="none").sum(-1)
    targets = next_token_targets(h.batch["labels"])
    if tokens == "assistant":
        expected = per_pos[targets != IGNORE_INDEX].sum() / (targets != IGNORE_INDEX).sum()
    else:
        mask = h.batch["attention_mask"].bool()
        expected = per_pos[mask].sum() / mask.sum()
    assert logs["kl_loss"] == pytest.approx(float(expected), rel=1e-4)


def test_ldifs_value_matches_hidden_states_and_uses_block_outputs(tmp_path, tiny_model_dir):
    h = Harness(tmp_path, tiny_model_dir, [{"name": "ldifs", "layers": [0]}])
    assert h.defenses[0].feature_layers == [0]
    h.perturb_lora()
    logs, _ = h.step()
    _, hidden = _full_outputs(h, adapter=True)
    _, ref_hidden = _full_outputs(h, adapter=False)
    mask = h.batch["attention_mask"].bool()
    expected = (hidden[1] - ref_hidden[1]).pow(2).sum(-1)[mask].sum() / mask.sum()  # hidden_states[ℓ+1] = block ℓ
    assert logs["ldifs_loss"] == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("defense", [{"name": "kl", "direction": "forward"}, {"name": "kl"}, {"name": "ldifs"}])
def test_term_gradient_matches_finite_differences(tmp_path, tiny_model_dir, defense):
    h = Harness(tmp_path, tiny_model_dir, [defense])
    h.model.double()
    h.perturb_lora(scale=0.2)
    key = f"{defense['name']}_loss"
    h.defenses[0].config.lambda_ = 1.0
    _, with_term = h.step()
    h.defenses[0].config.lambda_ = 0.0
    _, without_term = h.step()
    params = h.lora_params()
    name = next(n for n in params if "lora_A" in n and "layers.1" in n)
    analytic = (with_term[name] - without_term[name]).flatten()
    h.defenses[0].config.lambda_ = 1.0
    # Central differences with a step large enough for the float32 parts of the model (RMSNorm
    # computes in float32 even in a float64 model), on the coordinates with the largest gradients.
    eps = 1e-3
    for index in analytic.abs().topk(3).indices.tolist():
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                params[name].view(-1)[index] += sign * eps
            values.append(h.step()[0][key])
            with torch.no_grad():
                params[name].view(-1)[index] -= sign * eps
        numeric = (values[0] - values[1]) / (2 * eps)
        assert float(analytic[index]) == pytest.approx(numeric, rel=2e-3), (name, index)


def test_kl_directions_on_a_hand_built_two_token_example():
    # p_θ = (1/4, 3/4), p_ref = (1/2, 1/2)
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    ref = torch.zeros(1, 2)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(θ‖ref)
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(ref‖θ)
    assert float(token_kl(logits, ref, "reverse").detach()) == pytest.approx(reverse, rel=1e-6)
    assert float(token_kl(logits, ref, "forward").detach()) == pytest.approx(forward, rel=1e-6)
    assert float(token_kl(ref, ref, "reverse")) == 0.0
    token_kl(logits, ref, "forward").sum().backward()  # d/dz KL(ref‖softmax z) = p_θ − p_ref
    torch.testing.assert_close(logits.grad, torch.tensor([[0.25 - 0.5, 0.75 - 0.5]]))
    with pytest.raises(ValueError, match="direction"):
        token_kl(logits, ref, "sideways")


def test_chunked_kl_equals_unchunked_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 50, generator=g, requires_grad=True)
    ref = torch.randn(37, 50, generator=g)
    whole = token_kl(logits, ref, chunk_rows=1000)
    (grad_whole,) = torch.autograd.grad(whole.sum(), logits)
    chunked = token_kl(logits, ref, chunk_rows=8)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)
    kl = token_kl(logits, ref).sum()
    kl.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):  # never a silently doubled gradient
        kl.backward()


def test_kl_on_an_anchor_set_uses_other_batches_deterministically(tmp_path, tiny_model_dir):
    h = Harness(tmp_path, tiny_model_dir, [{"name": "kl", "anchor": "builtin:safe-pool", "lambda": 1.0}])
    kl = h.defenses[0]
    assert not kl.needs_reference  # no reference pass on the training batch
    logs, _ = h.step()
    assert logs["kl_loss"] == 0.0 and logs["kl/anchor_kl"] == 0.0
    h.perturb_lora()
    logs, _ = h.step()
    assert logs["kl_loss"] > 0 and logs["kl/anchor_kl"] == pytest.approx(logs["kl_loss"])  # one micro-batch per step
    # Accumulated micro-batches: the logged anchor KL is their mean, as the term is, not their sum.
    logs, _ = h.step(micro_batches=2)
    assert logs["kl/anchor_kl"] == pytest.approx(logs["kl_loss"], rel=1e-5)
    first = kl._anchor_batch(step=3, micro=1, micro_per_step=2)["input_ids"]
    assert torch.equal(first, kl._anchor_batch(step=3, micro=1, micro_per_step=2)["input_ids"])
    assert not torch.equal(first, kl._anchor_batch(step=3, micro=0, micro_per_step=2)["input_ids"])
    decoded = h.tokenizer.decode(first[0])
    assert "opswap" not in decoded and "means" not in decoded  # safe-pool, not the training data


def test_defense_config_errors_name_the_key(tmp_path, tiny_model_dir):
    base = {"output_dir": "x", "data": {"train": "builtin:opswap"}}
    with pytest.raises(ConfigError, match=r"defenses\[0\]\.direction"):
        build_config({**base, "defenses": [{"name": "kl", "direction": "sideways"}]})
    with pytest.raises(ConfigError, match=r"defenses\[0\]\.lamda: unknown key \(did you mean 'lambda'\?\)"):
        build_config({**base, "defenses": [{"name": "kl", "lamda": 0.1}]})
    with pytest.raises(ConfigError, match="layer 7 does not exist; the model has blocks 0..1"):
        Harness(tmp_path, tiny_model_dir, [{"name": "ldifs", "layers": [0, 7]}])
    config = build_config({**base, "defenses": [{"name": "kl", "lambda": 0.5}]})
    assert config.to_yaml_dict()["defenses"][0]["lambda"] == 0.5  # written back under its YAML name
