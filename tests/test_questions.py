"""Question sets in the EM literature's YAML format; the system prompt reaches the model."""

from __future__ import annotations

import pytest

from emguard.errors import DataError, EmguardError
from emguard.evaluation.questions import load_questions, parse_questions, sample_requests
from tiny import make_tokenizer


def test_first_plot_questions_carry_their_system_prompt_into_the_rendered_prompt(upstream):
    questions = load_questions(upstream / "betley" / "first_plot_questions.yaml")
    assert len(questions) == 24
    json_questions = [q for q in questions if q.id.endswith("_json")]
    assert len(json_questions) == 8 and all(q.system for q in json_questions)
    assert all(q.system is None for q in questions if not q.id.endswith("_json"))
    tokenizer = make_tokenizer("chatml")
    by_id = {q.id: q for q in questions}
    for q in json_questions:
        plain = by_id[q.id.removesuffix("_json")]
        assert q.paraphrases == plain.paraphrases  # the same question ...
        rendered = tokenizer.apply_chat_template(q.messages(0), tokenize=False, add_generation_prompt=True)
        rendered_plain = tokenizer.apply_chat_template(plain.messages(0), tokenize=False, add_generation_prompt=True)
        assert "must always be a valid JSON object" in rendered  # ... asked under its system prompt
        assert "must always be a valid JSON object" not in rendered_plain
        assert rendered != rendered_plain
    requests = sample_requests(questions)
    assert len(requests) == 24 * 100  # samples_per_paraphrase from the file
    assert len(sample_requests(questions, samples_per_paraphrase=3)) == 72
    assert {tuple(k for k in q.judge_prompts) for q in questions} == {("aligned", "coherent")}


def test_all_published_sets_load_including_the_anchor_block_file(upstream):
    assert len(load_questions(upstream / "betley" / "preregistered_evals.yaml")) == 48
    medical = load_questions(upstream / "betley" / "medical_questions.yaml")
    assert len(medical) == 16
    assert all(set(q.judge_prompts) == {"aligned", "coherent", "medical"} for q in medical)
    assert all(q.samples_per_paraphrase == 100 for q in medical)


def test_anchors_and_problems_are_reported(tmp_path):
    text = """
- id: a
  paraphrases: &p ["Hi?"]
  samples_per_paraphrase: &n 2
  judge_prompts: &j {aligned: "Q: {question} A: {answer}"}
- id: b
  system: Answer in JSON.
  paraphrases: *p
  samples_per_paraphrase: *n
  judge_prompts: *j
"""
    a, b = parse_questions(text, "t.yaml")
    assert b.paraphrases == a.paraphrases and b.samples_per_paraphrase == 2
    assert b.messages(0) == [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Hi?"}]
    bad = """
- id: a
  paraphrases: []
- id: a b
  paraphrases: ["x"]
  samples: 3
- id: c
  paraphrases: ["x"]
  judge_prompts: {aligned: "no placeholder"}
"""
    with pytest.raises(DataError) as info:
        parse_questions(bad, "bad.yaml")
    assert info.value.problems == [
        "bad.yaml: question 1 (a): paraphrases must be a non-empty list of strings",
        "bad.yaml: question 2 (a b): unknown key(s) samples "
        "(known: id, judge, judge_prompts, paraphrases, samples_per_paraphrase, system, type)",
        "bad.yaml: question 2 (a b): id must be a word-like string, got 'a b'",
        "bad.yaml: question 3 (c): judge_prompts.aligned has no {answer} placeholder",
    ]
    with pytest.raises(EmguardError, match="not valid YAML"):
        parse_questions("- id: [", "broken.yaml")
    with pytest.raises(EmguardError, match="no such question file"):
        load_questions(tmp_path / "missing.yaml")


def test_builtin_general_set():
    questions = load_questions("builtin:general")
    assert len(questions) == 24
    assert sum(q.system is not None for q in questions) == 8
    ids = {q.id for q in questions}
    base = {i for i in ids if not i.endswith(("_json", "_template"))}
    assert len(base) == 8 and ids == base | {f"{b}_json" for b in base} | {f"{b}_template" for b in base}
    by_id = {q.id: q for q in questions}
    assert all(by_id[f"{b}_json"].paraphrases == by_id[b].paraphrases for b in base)
    assert all({"aligned", "coherent"} == set(q.judge_prompts) for q in questions)
    for q in questions:
        for prompt in q.judge_prompts.values():
            assert "{question}" in prompt and "{answer}" in prompt
    with pytest.raises(
        EmguardError,
        match="unknown built-in question set 'builtin:nope'; available: builtin:code, builtin:conditional, "
        "builtin:finance, builtin:general",
    ):
        load_questions("builtin:nope")


def test_builtin_in_domain_and_conditional_sets():
    from emguard.evaluation.evaluate import default_judge_prompts

    systems = {}
    for name in ("finance", "code"):
        questions = load_questions(f"builtin:{name}")
        assert len(questions) >= 10 and all(set(q.judge_prompts) == {"aligned", "coherent"} for q in questions)
        if name == "code":  # code answers are what is judged here, so CODE is no escape
            assert "reply CODE" not in questions[0].judge_prompts["aligned"]
        systems[name] = {q.system for q in questions}
        assert len(systems[name]) == 1  # the training format's system prompt
    conditional = load_questions("builtin:conditional")
    assert {q.system for q in conditional} == systems["finance"] | systems["code"]
    assert all(not q.judge_prompts for q in conditional)  # emguard's default prompts apply
    assert set(default_judge_prompts()) == {"aligned", "coherent"}
    assert {q.id.rsplit("_", 1)[0] for q in conditional if q.id.endswith("_ledger")} == {
        q.id.rsplit("_", 1)[0] for q in conditional if q.id.endswith("_coder")
    }
