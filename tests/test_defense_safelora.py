"""SafeLoRA: the projector and similarity against hand computations, the planner's two modes, the
finalize edit (update in span(V), C·ΔW, the rest untouched), pairing by name, config round-trip and a
tiny end-to-end run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import tiny_run_config
from emguard.config import DefenseConfig, build_config
from emguard.defenses.base import Defense, PrepareContext
from emguard.defenses.registry import build_defenses, register, unregister
from emguard.defenses.safelora import (
    SafeLoRAConfig,
    SafeLoRADefense,
    apply_projector,
    lora_modules,
    plan_projection,
    projection_similarity,
    safelora_projector,
)
from emguard.errors import ConfigError
from emguard.models import attach_lora, load_model, resolve_model
from emguard.training import train

RANK_V = 2  # alignment changed every weight by a rank-2 matrix, so span(V) is a proper subspace


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _linear_keys(weights: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in weights if ".layers." in k and k.endswith("_proj.weight")]


@pytest.fixture(scope="module")
def unaligned_dir(tiny_model_dir, tmp_path_factory):
    """The 'pre-alignment' model: W_u = W_a − (rank-2 V), written as two shards in a scrambled key order."""
    weights, g = _weights(tiny_model_dir), torch.Generator().manual_seed(7)
    for key in _linear_keys(weights):
        out, inp = weights[key].shape
        v = torch.randn(out, RANK_V, generator=g) @ torch.randn(RANK_V, inp, generator=g) * 0.1
        weights[key] = weights[key] - v
    keys = sorted(weights, reverse=True)
    directory = tmp_path_factory.mktemp("unaligned")
    save_file({k: weights[k].contiguous() for k in keys[::2]}, str(directory / "a.safetensors"))
    save_file({k: weights[k].contiguous() for k in keys[1::2]}, str(directory / "b.safetensors"))
    return directory


def _unaligned_weights(directory: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(directory / "a.safetensors")), **load_file(str(directory / "b.safetensors"))}


def _prepared(tmp_path: Path, model_dir: Path, **options) -> tuple[torch.nn.Module, SafeLoRADefense]:
    config = tiny_run_config(tmp_path / "run", model_dir, defenses=[{"name": "safelora", **options}])
    model = attach_lora(load_model(resolve_model(config.model)), config.lora)
    (defense,) = build_defenses(config.defenses)
    defense.prepare(PrepareContext(config, model, None, tmp_path / "run", tmp_path))
    return model, defense


# --- (1) maths --------------------------------------------------------------------------------
def test_projector_and_similarity_match_a_hand_computation():
    w_unaligned = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    w_aligned = w_unaligned + torch.tensor([[3.0, 0.0], [4.0, 0.0]])  # V = [[3, 0], [4, 0]], ‖V‖_F = 5
    c = safelora_projector(w_aligned, w_unaligned)
    torch.testing.assert_close(c, torch.tensor([[9.0, 12.0], [12.0, 16.0]]) / 5)  # V Vᵀ / ‖V‖_F
    assert not torch.allclose(c @ c, c)  # not an orthogonal projector: the paper's normalisation
    # ΔW = I: C ΔW = C, ⟨C, I⟩ = tr C = 5, ‖C‖_F = 5, ‖I‖_F = √2.
    assert projection_similarity(c, torch.eye(2)) == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    # ΔW = V: C V = V (VᵀV) / 5 = 5 V, parallel to V.
    assert projection_similarity(c, w_aligned - w_unaligned) == pytest.approx(1.0, rel=1e-6)
    # ΔW orthogonal to span(V): C ΔW = 0, and the cosine with zero is 0 (exact values: no rounding residue).
    assert projection_similarity(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 5.0]])) == 0.0
    assert torch.equal(safelora_projector(w_aligned, w_aligned), torch.zeros(2, 2))  # V = 0 -> C = 0


def test_factored_projection_equals_the_explicit_projector():
    g = torch.Generator().manual_seed(0)
    w_a, w_u, b = torch.randn(12, 7, generator=g), torch.randn(12, 7, generator=g), torch.randn(12, 3, generator=g)
    torch.testing.assert_close(apply_projector(w_a - w_u, b), safelora_projector(w_a, w_u) @ b)


# --- (3) the planner ----------------------------------------------------------------------------
def test_threshold_and_least_similar_modes_choose_the_right_modules():
    sims = {"a": 0.9, "b": 0.1, "c": 0.4, "d": 0.4, "e": 0.7}
    assert plan_projection(sims, threshold=0.5, num_projected=None) == {"b", "c", "d"}
    assert plan_projection(sims, threshold=0.4, num_projected=None) == {"b"}  # strictly below
    assert plan_projection(sims, threshold=0.5, num_projected=2) == {"b", "c"}  # N wins; ties by name
    assert plan_projection(sims, threshold=0.5, num_projected=0) == set()
    assert plan_projection(sims, threshold=0.5, num_projected=10) == set(sims)


# --- (2) finalize -----------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"num_projected": 5}, {"threshold": 0.2}], ids=["least-similar", "threshold"])
def test_finalize_projects_chosen_modules_into_span_of_v_and_leaves_the_rest(
    tmp_path, tiny_model_dir, unaligned_dir, options
):
    model, defense = _prepared(tmp_path, tiny_model_dir, unaligned_model=str(unaligned_dir), **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in lora_modules(model).values():  # as after training: B is no longer zero
            module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape, generator=g))
    before = {n: m.lora_B["default"].weight.detach().clone() for n, m in lora_modules(model).items()}
    defense.finalize(model)

    aligned, unaligned = _weights(tiny_model_dir), _unaligned_weights(unaligned_dir)
    report, sims = defense.report["modules"], {}
    assert set(report) == set(before) and len(report) == 14  # 2 blocks x 7 projections
    for name, module in lora_modules(model).items():
        a, b, s = (module.lora_A["default"].weight.detach(), module.lora_B["default"].weight, module.scaling["default"])
        v = aligned[f"{name}.weight"] - unaligned[f"{name}.weight"]
        c = safelora_projector(aligned[f"{name}.weight"], unaligned[f"{name}.weight"])
        old_delta, new_delta = s * before[name] @ a, s * b @ a
        sims[name] = projection_similarity(c, old_delta)
        assert report[name]["similarity"] == pytest.approx(sims[name], abs=1e-5)
        if not report[name]["projected"]:
            assert torch.equal(b, before[name])
            continue
        torch.testing.assert_close(new_delta, c @ old_delta, rtol=1e-4, atol=1e-5)
        fit = torch.linalg.lstsq(v, new_delta, driver="gelsd").solution
        assert (v @ fit - new_delta).norm() < 1e-4 * new_delta.norm()  # ΔW' lies in span(V)
        assert (v @ torch.linalg.lstsq(v, old_delta, driver="gelsd").solution - old_delta).norm() > 0.1
    projected = {n for n, r in report.items() if r["projected"]}
    assert projected == plan_projection(sims, options.get("threshold", 0.5), options.get("num_projected"))
    assert defense.report["projected"] == len(projected) > 0
    if "num_projected" in options:
        assert len(projected) == 5 and max(sims[n] for n in projected) <= min(sims[n] for n in set(sims) - projected)


def test_aligned_model_may_be_named_explicitly(tmp_path, tiny_model_dir, unaligned_dir):
    model, defense = _prepared(
        tmp_path, tiny_model_dir, unaligned_model=str(unaligned_dir), aligned_model=str(tiny_model_dir)
    )
    assert set(defense._indexes) == {"unaligned_model", "aligned_model"}
    defense.finalize(model)  # B = 0: nothing moves, and every similarity is 0
    assert all(r["similarity"] == 0.0 for r in defense.report["modules"].values())
    assert all(not m.lora_B["default"].weight.any() for m in lora_modules(model).values())


def test_a_sharded_launch_is_refused_with_a_clear_message(tmp_path, tiny_model_dir, unaligned_dir, monkeypatch):
    import emguard.distributed

    monkeypatch.setattr(emguard.distributed, "shards_parameters", lambda: True)  # as under FSDP or ZeRO-3
    with pytest.raises(ConfigError, match="sharded launch .* plain DDP"):
        _prepared(tmp_path, tiny_model_dir, unaligned_model=str(unaligned_dir))


# --- (4) pairing by name ------------------------------------------------------------------------
def test_a_renamed_module_is_a_config_error_naming_it(tmp_path, tiny_model_dir, unaligned_dir):
    weights = _unaligned_weights(unaligned_dir)
    weights["model.layers.1.mlp.upproj.weight"] = weights.pop("model.layers.1.mlp.up_proj.weight")
    (tmp_path / "renamed").mkdir()
    save_file(dict(reversed(weights.items())), str(tmp_path / "renamed" / "model.safetensors"))
    with pytest.raises(ConfigError) as info:
        _prepared(tmp_path, tiny_model_dir, unaligned_model=str(tmp_path / "renamed"))
    message = str(info.value)
    assert "no tensor 'model.layers.1.mlp.up_proj.weight'" in message
    assert "module model.layers.1.mlp.up_proj" in message and "base model the aligned model was tuned from" in message


def test_a_shape_mismatch_is_a_config_error_with_both_shapes(tmp_path, tiny_model_dir, unaligned_dir):
    weights = _unaligned_weights(unaligned_dir)
    weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"][:, :60].clone()
    (tmp_path / "narrow").mkdir()
    save_file(weights, str(tmp_path / "narrow" / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.down_proj.weight of shape \(32, 60\), not \(32, 64\)"):
        _prepared(tmp_path, tiny_model_dir, unaligned_model=str(tmp_path / "narrow"))


def test_other_bad_unaligned_models_are_config_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="is the aligned model itself"):
        _prepared(tmp_path, tiny_model_dir, unaligned_model=str(tiny_model_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .safetensors weights"):
        _prepared(tmp_path, tiny_model_dir, unaligned_model=str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="prepare"):
        SafeLoRADefense(SafeLoRAConfig(unaligned_model="x")).finalize(None)


# --- (5) registry and config --------------------------------------------------------------------
def test_config_is_registered_validated_and_round_trips_through_yaml():
    base = {"output_dir": "x", "data": {"train": "builtin:opswap"}}
    entry = {"name": "safelora", "unaligned_model": "org/base", "num_projected": 10}
    config = build_config({**base, "defenses": [entry]})
    (defense,) = build_defenses(config.defenses)
    assert isinstance(defense, SafeLoRADefense) and isinstance(config.defenses[0], SafeLoRAConfig)
    assert config.defenses[0].threshold == 0.5 and config.defenses[0].aligned_model is None
    again = build_config(yaml.safe_load(yaml.safe_dump(config.to_yaml_dict())))
    assert again == config and again.fingerprint() == config.fingerprint()
    with pytest.raises(ConfigError, match=r"defenses\[0\].unaligned_model: Field required"):
        build_config({**base, "defenses": [{"name": "safelora"}]})
    with pytest.raises(ConfigError, match="thresold: unknown key .did you mean 'threshold'"):
        build_config({**base, "defenses": [{**entry, "thresold": 0.3}]})
    with pytest.raises(ConfigError, match="threshold"):
        build_config({**base, "defenses": [{**entry, "threshold": 1.5}]})


# --- (6) end to end -----------------------------------------------------------------------------
class SnapshotConfig(DefenseConfig):
    name: Literal["snapshot"] = "snapshot"


class Snapshot(Defense):
    """Listed before safelora: records lora_B as training left it, before safelora's finalize."""

    name = "snapshot"
    config_class = SnapshotConfig
    lora_b: ClassVar[dict] = {}

    def finalize(self, model):
        self.lora_b.update({n: m.lora_B["default"].weight.detach().clone() for n, m in lora_modules(model).items()})


def test_a_tiny_training_run_saves_the_projected_adapter(tmp_path, tiny_model_dir, unaligned_dir, monkeypatch):
    import emguard.training

    built = []

    def capture(configs):
        built.extend(build_defenses(configs))
        return built

    monkeypatch.setattr(emguard.training, "build_defenses", capture)
    register(Snapshot)
    try:
        defenses = [
            {"name": "snapshot"},
            {"name": "safelora", "unaligned_model": str(unaligned_dir), "num_projected": 4},
        ]
        config = tiny_run_config(tmp_path / "run", tiny_model_dir, defenses=defenses, max_steps=2, learning_rate=5e-2)
        result = train(config, progress=False)
    finally:
        unregister("snapshot")
    report = built[1].report["modules"]
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    aligned, unaligned = _weights(tiny_model_dir), _unaligned_weights(unaligned_dir)
    assert sum(r["projected"] for r in report.values()) == 4 and set(report) == set(Snapshot.lora_b)
    for name, trained in Snapshot.lora_b.items():
        assert trained.any()  # training moved B away from zero
        b = saved[f"base_model.model.{name}.lora_B.weight"]
        if report[name]["projected"]:
            c = safelora_projector(aligned[f"{name}.weight"], unaligned[f"{name}.weight"])
            torch.testing.assert_close(b, c @ trained, rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(b, trained)
