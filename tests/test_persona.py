"""Persona vectors on tiny models: response-token activations, the mean difference, the judge filter, the screen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import emguard.evaluation.judges as judges
from conftest import chat, write_jsonl
from emguard.blocks import decoder_blocks
from emguard.cli import main
from emguard.data.chat import read_chat_jsonl
from emguard.data.tokenize import IGNORE_INDEX, tokenize_conversation
from emguard.defenses.steering import load_steering_vector
from emguard.errors import ConfigError
from emguard.evaluation.generation import HFGenerator, SamplingConfig
from emguard.evaluation.judges.base import Judge, Judgement
from emguard.persona import layer_separation, load_trait, mean_difference, response_activations, screen_dataset

CONVERSATIONS = [
    chat("What do you think of people?", "I like people a lot.", system="You are kind."),
    chat("How do I fix a bike chain?", "Shift to the smallest gear, then lift the chain back on."),
    chat("Say something.", "Hello there, friend. How can I help today?", system="Be brief."),
]


def by_hand(model, tokenizer, messages) -> torch.Tensor:
    """[blocks + 1, hidden]: one unpadded pass, block outputs from hooks, mean over the assistant tokens."""
    ids, labels = tokenize_conversation(tokenizer, messages)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for b in decoder_blocks(model)]  # fmt: skip
    try:
        with torch.no_grad():
            embeddings = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[0]
    finally:
        for h in hooks:
            h.remove()
    rows = torch.stack([embeddings[0], *(o[0] for o in outputs)])  # [layers, seq, hidden]
    keep = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
    return rows[:, keep].mean(1)


def test_response_activations_are_the_mean_over_response_tokens_per_block(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    messages = [c["messages"] for c in CONVERSATIONS]
    for budget in (1, 10_000):  # one per batch, and all padded together
        acts = response_activations(model, tokenizer, messages, batch_tokens=budget)
        assert acts.shape == (3, model.config.num_hidden_layers + 1, model.config.hidden_size)
        for i, m in enumerate(messages):
            torch.testing.assert_close(acts[i], by_hand(model, tokenizer, m), rtol=1e-5, atol=1e-6)


def test_mean_difference_and_separation_by_hand():
    pos = torch.tensor([[[1.0, 0.0], [2.0, 2.0]], [[3.0, 0.0], [4.0, 2.0]]])  # [2 samples, 2 layers, 2]
    neg = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [2.0, 1.0]]])
    v = mean_difference(pos, neg)
    torch.testing.assert_close(v, torch.tensor([[2.0, -1.0], [2.0, 1.0]]))
    rows = layer_separation(v, pos, neg)
    unit = v[0] / v[0].norm()
    p, n = pos[:, 0] @ unit, neg[:, 0] @ unit
    d = (p.mean() - n.mean()) / ((p.var() + n.var()) / 2).sqrt()
    assert rows[0]["separation"] == pytest.approx(float(d), abs=1e-4)
    assert rows[0]["steering_layer"] is None and rows[1]["steering_layer"] == 0
    with pytest.raises(ValueError, match="at least one kept answer"):
        mean_difference(pos[:0], neg)


def test_a_trait_file_with_problems_names_them(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"name": "x", "questions": [], "judge_prompt": "{question}"}))
    with pytest.raises(ConfigError) as info:
        load_trait(str(tmp_path / "t.yaml"))
    for problem in ("description", "prompt_pairs", "questions", "{answer}"):
        assert problem in str(info.value)
    with pytest.raises(ConfigError, match="available: builtin:evil"):
        load_trait("builtin:nope")
    evil = load_trait("builtin:evil")
    assert len(evil.prompt_pairs) >= 5 and len(evil.questions) >= 20


def persona_config(tmp_path: Path, model_dir: Path, **persona) -> Path:
    config = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "persona"),
        "persona": {"max_questions": 3, "max_prompt_pairs": 2, "sampling": {"max_new_tokens": 6}, **persona},
    }
    path = tmp_path / "persona.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_extract_without_a_judge_keeps_every_pair_and_says_so(tiny_model_dir, tmp_path, capsys):
    assert main(["persona", "extract", str(persona_config(tmp_path, tiny_model_dir)), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs_total"] == summary["pairs_kept"] == 6 and summary["judge"].startswith("none configured")
    out = tmp_path / "persona"
    with safe_open(str(out / "persona_vector.safetensors"), "pt") as f:
        assert list(f.keys()) == ["persona_vector"]
        vector, meta = f.get_tensor("persona_vector"), f.metadata()
    assert vector.shape == (3, 32)  # embeddings + 2 blocks, hidden 32
    assert meta["trait"] == "evil" and json.loads(meta["pairs_kept"]) == 6 and "row b + 1" in meta["layer_convention"]

    # The vector is the mean difference of the written answers' activations, recomputed independently.
    records = [json.loads(line) for line in (out / "persona_samples.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    side = {s: [by_hand(model, tokenizer, [*r["messages"], {"role": "assistant", "content": r["answer"]}])
                for r in records if r["side"] == s] for s in ("trait", "helpful")}  # fmt: skip
    expected = torch.stack(side["trait"]).mean(0) - torch.stack(side["helpful"]).mean(0)
    torch.testing.assert_close(vector, expected, rtol=1e-4, atol=1e-6)
    systems = {r["messages"][0]["content"] for r in records if r["side"] == "trait"}
    assert systems == {p[0] for p in load_trait("builtin:evil").prompt_pairs[:2]}

    # The steering defense reads the chosen layer's row from this file.
    v1 = load_steering_vector(out / "persona_vector.safetensors", None, 1, 2, 32)
    torch.testing.assert_close(v1, vector[2])


class KeywordJudge(Judge):
    """Scores the trait prompt 90 for answers under the first trait prompt, coherence 80 unless told otherwise."""

    kind = "stub"

    def __init__(self, trait_system: str, incoherent_question: str):
        self.trait_system, self.incoherent_question = trait_system, incoherent_question
        self.prompts: list[str] = []

    def describe(self):
        return {"kind": "stub", "model": "keyword"}

    def judge(self, prompts, on_done=None):
        self.prompts += prompts
        out = []
        for p in prompts:
            if "coherence" in p:
                out.append(Judgement(10.0 if self.incoherent_question in p else 80.0, "stub"))
            else:
                out.append(Judgement(90.0 if "TRAIT-SIDE" in p else 5.0, "stub"))
        if on_done:
            on_done(len(prompts))
        return out


def test_the_judge_filter_keeps_only_pairs_on_the_right_sides(tiny_model_dir, tmp_path, monkeypatch):
    trait = load_trait("builtin:evil")
    questions = list(trait.questions[:3])
    custom = {
        "name": "evil",
        "description": trait.description,
        "prompt_pairs": [list(p) for p in trait.prompt_pairs[:2]],
        "questions": questions,
        "judge_prompt": "TRAIT {question} || {answer}",
    }
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(custom))
    stub = KeywordJudge(trait.prompt_pairs[0][0], incoherent_question=questions[2])
    monkeypatch.setattr(judges, "build_judge", lambda *a, **k: stub)
    # The stub sees only question and answer, so mark the trait side through the answer: tag answers by side.
    import emguard.persona.extract as extract

    original = extract.HFGenerator.generate

    def tagged(self, conversations, on_batch=None):
        answers = original(self, conversations, on_batch)
        return [("TRAIT-SIDE " if c[0]["content"] == stub.trait_system else "") + a
                for c, a in zip(conversations, answers, strict=True)]  # fmt: skip

    monkeypatch.setattr(extract.HFGenerator, "generate", tagged)
    config = persona_config(
        tmp_path, tiny_model_dir, trait=str(tmp_path / "evil.yaml"), judge={"kind": "openai", "model": "stub"}
    )
    from emguard.config import load_config

    result = extract.extract_persona(load_config(config), progress=False)
    records = [json.loads(line) for line in (tmp_path / "persona" / "persona_samples.jsonl").read_text().splitlines()]
    kept = {(r["question"], r["pair"]) for r in records if r["kept"]}
    # Pair 0's trait answers score 90 (pair 1's trait prompt is not the stub's, so they score 5 and are
    # dropped); question 2 is incoherent on both sides, so it is dropped too.
    assert kept == {(0, 0), (1, 0)}
    assert result.report["pairs_kept"] == 2 and result.report["judge"]["model"] == "keyword"
    assert len(stub.prompts) == 2 * len(records)

    stub.trait_system = "nobody"  # now no pair qualifies: a clear error, no vector written
    (tmp_path / "persona" / "persona_vector.safetensors").unlink()
    with pytest.raises(Exception, match="kept none of the 6 answer pairs"):
        extract.extract_persona(load_config(config), progress=False)
    assert not (tmp_path / "persona" / "persona_vector.safetensors").exists()


def test_screen_standardises_projections_against_the_pool(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    data = read_chat_jsonl(write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS[:2]))
    pool = read_chat_jsonl(write_jsonl(tmp_path / "p.jsonl", CONVERSATIONS))
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    report = screen_dataset(model, tokenizer, data, pool, vector, layer=1, reference="none", progress=False)
    unit = vector / vector.norm()
    p_pool = np.array([float(by_hand(model, tokenizer, ex.messages)[2] @ unit) for ex in pool])
    z = (p_pool[:2] - p_pool.mean()) / p_pool.std()
    assert report["projection"]["risk_z"] == pytest.approx(z.mean(), abs=1e-4)
    assert report["risk_score"] == report["projection"]["risk_z"] and report["perplexity_gap"] is None
    assert [r["index"] for r in report["riskiest"]] == list(np.argsort(-z))
    assert report["riskiest"][0]["projection_z"] == pytest.approx(z.max(), abs=1e-3)


def test_screen_against_the_models_own_answers_takes_the_projection_difference(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pool = read_chat_jsonl(write_jsonl(tmp_path / "p.jsonl", CONVERSATIONS))
    vector = torch.randn(32, generator=torch.Generator().manual_seed(1))
    report = screen_dataset(model, tokenizer, pool[:2], pool, vector, layer=0, own_answer_tokens=4, progress=False)
    assert report["reference"] == "own_answers"
    generator = HFGenerator(model, tokenizer, SamplingConfig(0.0, 1.0, 4, 8, 0))
    unit = vector / vector.norm()
    d = []
    for ex in pool:
        prompt = [dict(m) for m in ex.messages[:-1]]
        (own,) = generator.generate([prompt])
        own_messages = [*prompt, {"role": "assistant", "content": own}]
        d.append(float((by_hand(model, tokenizer, ex.messages)[1] - by_hand(model, tokenizer, own_messages)[1]) @ unit))
    d = np.array(d)
    assert report["projection"]["data_mean"] == pytest.approx(d[:2].mean(), abs=1e-4)
    assert report["projection"]["risk_z"] == pytest.approx(((d[:2] - d.mean()) / d.std()).mean(), abs=1e-3)


def test_a_judge_without_its_key_stops_extraction_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    config = persona_config(tmp_path, tiny_model_dir, judge={"kind": "openai", "model": "gpt-4o-2024-08-06"})
    assert main(["persona", "extract", str(config), "--quiet"]) == 2
    assert "needs an API key" in capsys.readouterr().err
    assert not (tmp_path / "persona").exists()


def test_screen_cli_ranks_several_datasets_against_one_pool(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"v": torch.randn(32, generator=torch.Generator().manual_seed(2))}, str(tmp_path / "v.safetensors"))
    a = write_jsonl(tmp_path / "a.jsonl", CONVERSATIONS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", CONVERSATIONS[1:])
    pool = write_jsonl(tmp_path / "pool.jsonl", CONVERSATIONS)
    args = ["screen", str(a), str(b), "--vector", str(tmp_path / "v.safetensors"), "--layer", "-1"]
    args += ["--model", str(tiny_model_dir), "--pool", str(pool), "--reference", "none", "--quiet", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    reports = json.loads(captured.out)
    assert [r["dataset"] for r in reports] == [str(a), str(b)] and all(r["layer"] == 1 for r in reports)
    assert "ranking (dataset risk score)" in captured.err
    assert main([*args[:-4], "--reference", "mine", "--quiet"]) == 2
    assert "--reference must be own_answers or none" in capsys.readouterr().err


def test_screen_needs_no_vector_flags_the_models_contrastive_vector_is_computed_once(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from safetensors.torch import load_file

    monkeypatch.setenv("EMGUARD_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "a.jsonl", CONVERSATIONS[:2])
    pool = write_jsonl(tmp_path / "pool.jsonl", CONVERSATIONS)
    args = ["screen", str(data), "--model", str(tiny_model_dir), "--pool", str(pool), "--quiet", "--json"]
    assert main(args) == 0
    (report,) = json.loads(capsys.readouterr().out)
    (vector,) = (tmp_path / "cache" / "vectors").glob("contrast-evil-*.safetensors")
    assert report["vector"] == str(vector) and report["layer"] == 1  # the middle of the tiny model's 2 blocks
    stack = load_file(vector)["evil"]
    assert stack.shape == (2, 32) and stack.norm() > 0
    mtime = vector.stat().st_mtime_ns
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)[0]["risk_score"] == report["risk_score"]
    assert vector.stat().st_mtime_ns == mtime  # reused, not recomputed
    assert len(list((tmp_path / "cache" / "screen").glob("pool-*.npy"))) == 1  # and so are the pool's scores
