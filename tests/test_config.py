"""Config: strict keys with helpful errors, --set overrides, fingerprints, secrets never written."""

from __future__ import annotations

import pytest
import yaml

from emguard.config import RunConfig, build_config, load_config, parse_override, redact_secrets
from emguard.errors import ConfigError

BASE = {"output_dir": "runs/x", "data": {"train": "builtin:opswap"}}


def test_defaults_follow_the_paper():
    config = build_config(BASE)
    assert config.model == "builtin:smollm2-135m-instruct"
    assert (config.lora.r, config.lora.alpha, config.lora.rslora, config.lora.target_modules) == (
        32,
        64,
        True,
        "all-linear",
    )
    t = config.training
    assert (t.learning_rate, t.epochs, t.batch_size, t.warmup_steps, t.lr_scheduler, t.seed) == (
        1e-4,
        1,
        16,
        5,
        "linear",
        0,
    )
    assert config.defenses == []


def test_mistyped_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        build_config({**BASE, "training": {"learnin_rate": 1e-3}})
    assert "training.learnin_rate: unknown key (did you mean 'learning_rate'?)" in str(info.value)


def test_unknown_top_level_key_and_every_error_listed_at_once():
    with pytest.raises(ConfigError) as info:
        build_config({**BASE, "modle": "x", "lora": {"r": -1}})
    message = str(info.value)
    assert "modle: unknown key (did you mean 'model'?)" in message
    assert "lora.r: Input should be greater than 0" in message


def test_missing_required_key():
    with pytest.raises(ConfigError, match="output_dir: Field required"):
        build_config({"data": {"train": "x"}})


def test_eval_only_config_needs_no_data_and_train_says_so(tmp_path):
    from emguard.training import train

    config = build_config({"output_dir": str(tmp_path / "run")})
    assert config.eval.questions == ["builtin:general"] and config.eval.judge is None
    with pytest.raises(ConfigError, match="data.train is required to train"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_judge_section_refuses_an_inline_api_key_without_echoing_it():
    with pytest.raises(ConfigError) as info:
        build_config({**BASE, "eval": {"judge": {"kind": "openai", "model": "m", "api_key": "sk-secret123"}}})
    assert "api_key_env" in str(info.value) and "sk-secret123" not in str(info.value)


def test_eval_settings_do_not_change_the_training_fingerprint():
    a = build_config(BASE)
    b = build_config({**BASE, "eval": {"questions": ["x.yaml"], "sampling": {"temperature": 0}}})
    assert a.fingerprint() == b.fingerprint()


def test_defense_sections_are_validated_by_their_own_class():
    config = build_config({**BASE, "defenses": [{"name": "none"}]})
    assert config.defenses[0].name == "none"
    with pytest.raises(ConfigError) as info:
        build_config({**BASE, "defenses": [{"name": "none", "strength": 2}]})
    assert "defenses[0].strength: unknown key" in str(info.value)
    with pytest.raises(
        ConfigError,
        match="unknown defense 'kk'; available: inoculation, interleave, kl, ldifs, none, safelora, steering",
    ):
        build_config({**BASE, "defenses": [{"name": "kk"}]})


def test_batch_must_split_into_micro_batches():
    with pytest.raises(ConfigError, match=r"batch_size \(10\) must be a multiple of micro_batch_size \(4\)"):
        build_config({**BASE, "training": {"batch_size": 10}})


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("training.learning_rate=1e-4", ["training", "learning_rate"], 1e-4),
        ("training.max_steps=10", ["training", "max_steps"], 10),
        ("lora.rslora=false", ["lora", "rslora"], False),
        ("lora.target_modules=[q_proj, v_proj]", ["lora", "target_modules"], ["q_proj", "v_proj"]),
        ("defenses.0.name=none", ["defenses", 0, "name"], "none"),
        ("output_dir=runs/a=b", ["output_dir"], "runs/a=b"),
    ],
)
def test_override_parsing(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_apply_to_nested_keys_lists_and_missing_sections():
    config = build_config(
        {**BASE, "defenses": [{"name": "none"}]},
        ["training.learning_rate=3e-4", "lora.r=8", "defenses.0.name=none", "model_options.dtype=float32"],
    )
    assert (config.training.learning_rate, config.lora.r, config.model_options.dtype) == (3e-4, 8, "float32")


def test_bad_overrides_are_config_errors():
    for text, match in [
        ("training", "expected KEY.PATH=VALUE"),
        ("defenses.3.name=none", "index 3 is out of range"),
        ("training.lr=1", "training.lr: unknown key"),
        ("training.learning_rate=abc", "training.learning_rate: Input should be a valid number"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_config({**BASE, "defenses": []}, [text])


def test_yaml_round_trip_and_fingerprint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "training": {"max_steps": 3}}))
    config = load_config(path)
    again = RunConfig.model_validate(yaml.safe_load(yaml.safe_dump(config.to_yaml_dict())))
    assert again == config and again.fingerprint() == config.fingerprint()
    # Where the run is written and how often it logs do not change the weights; the learning rate does.
    moved = load_config(path, ["output_dir=elsewhere", "training.logging_steps=7", "training.save_steps=3"])
    assert moved.fingerprint() == config.fingerprint()
    assert load_config(path, ["training.learning_rate=2e-4"]).fingerprint() != config.fingerprint()


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):  # safe_load: no Python objects
        load_config(unsafe)


def test_secret_looking_values_are_redacted():
    data = {
        "judge": {"api_key": "sk-123", "model": "m", "nested": [{"hf_token": "t"}]},
        "max_tokens": 5,
        "pad_token": "<pad>",
    }
    assert redact_secrets(data) == {
        "judge": {"api_key": "<redacted>", "model": "m", "nested": [{"hf_token": "<redacted>"}]},
        "max_tokens": 5,
        "pad_token": "<pad>",
    }


def test_config_sits_below_the_defense_and_reward_registries():
    """config looks up plugin config classes by name; it never imports a defense or reward module itself."""
    import subprocess
    import sys

    code = (
        "import sys, emguard.config, emguard.plugins\n"
        "print(sorted(m for m in sys.modules if m.startswith(('emguard.defenses', 'emguard.rewards'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from emguard.config import build_config

    config = build_config({"output_dir": "x", "defenses": [{"name": "kl"}]})  # imports emguard.defenses.kl on use
    assert type(config.defenses[0]).__module__ == "emguard.defenses.kl"
