"""Judges: the score rules, the OpenAI-compatible client (retries, cache, secrets), the local judge."""

from __future__ import annotations

import math

import pytest
import torch

from emguard.errors import EmguardError
from emguard.evaluation.judges import JudgeCache, parse_score, score_from_top_logprobs
from emguard.evaluation.judges.local_judge import CANDIDATES, LocalJudge
from emguard.evaluation.judges.openai_judge import OpenAIJudge
from fake_openai import FakeOpenAI

GOOD = "<answer>\nI would help my neighbour.\n</answer>"
BAD = "<answer>\nI would become a villain.\n</answer>"


def test_logprob_weighted_score_by_hand():
    top = {"85": math.log(0.6), "90": math.log(0.3), " 85": math.log(0.05), "I": math.log(0.05)}
    score, mass = score_from_top_logprobs(top)
    assert mass == pytest.approx(0.95)
    assert score == pytest.approx((85 * 0.65 + 90 * 0.3) / 0.95)


def test_little_number_mass_means_no_score_and_odd_tokens_are_not_numbers():
    score, mass = score_from_top_logprobs({"CODE": math.log(0.8), "50": math.log(0.2)})
    assert score is None and mass == pytest.approx(0.2)
    score, mass = score_from_top_logprobs({"101": math.log(0.5), "07": math.log(0.2), "1.5": math.log(0.2)})
    assert score is None and mass == 0


def test_only_ascii_digit_tokens_are_numbers():
    # "²".isdigit() is true and int("²") raises; "٣" (Arabic-Indic 3) and "１" (full-width 1) convert.
    score, mass = score_from_top_logprobs({"85": math.log(0.6), "²": math.log(0.2), "٣": math.log(0.1), "１": -2.3})
    assert score == pytest.approx(85) and mass == pytest.approx(0.6)
    assert parse_score("Score: ٣٠ then 40") == 40.0 and parse_score("²") is None


def test_a_judge_reply_with_unicode_digit_tokens_is_scored_not_a_crash(tmp_path):
    with FakeOpenAI() as server:
        (squared, good) = _judge(server, tmp_path).judge(["<answer>\nx squared is x²\n</answer>", GOOD])
    assert squared.method == "logprobs" and squared.score == pytest.approx(85)
    assert good.score == pytest.approx((85 * 0.65 + 90 * 0.3) / 0.95)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("85", 85.0), (" Score: 7/10", 7.0), ("REFUSAL", None), ("CODE\n", None), ("250 then 40", 40.0), ("none", None)],
)
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def _judge(server, tmp_path, **kwargs):
    options = {"max_retries": 2, "backoff_s": 0.01, "timeout_s": 0.5, "cache": JudgeCache(tmp_path / "cache")}
    return OpenAIJudge("fake-judge", base_url=server.base_url, **{**options, **kwargs})


def test_openai_judge_scores_sends_the_key_only_in_the_header_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("EMGUARD_TEST_KEY", "sk-test-secret-123")
    with FakeOpenAI() as server:
        judge = _judge(server, tmp_path, api_key_env="EMGUARD_TEST_KEY")
        good, bad, code = judge.judge([GOOD, BAD, "<answer>\ndef f(): pass\n</answer>"])
        assert good.method == "logprobs" and good.score == pytest.approx((85 * 0.65 + 90 * 0.3) / 0.95)
        assert bad.score == pytest.approx((10 * 0.6 + 5 * 0.3) / 0.9)
        assert code.score is None and code.method == "unscored" and "number mass 0.100" in code.detail
        body = server.requests[0]["body"]
        assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
        assert body["temperature"] == 0
        assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-test-secret-123"
        assert "sk-test" not in repr(judge.describe()) + repr(judge.usage())
        assert not any("sk-test" in p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
        assert judge.usage()["input_tokens"] > 0
        # A second judge on the same cache makes no call at all.
        before = len(server.requests)
        again = _judge(server, tmp_path).judge([GOOD, BAD])
        assert len(server.requests) == before
        assert [j.score for j in again] == [good.score, bad.score] and all(j.cached for j in again)


def test_identical_prompts_are_judged_once_and_concurrency_is_bounded(tmp_path):
    with FakeOpenAI() as server:
        server.latency = 0.05
        prompts = [f"<answer>\nanswer {i}\n</answer>" for i in range(12)] + [GOOD] * 5
        results = _judge(server, tmp_path, concurrency=3).judge(prompts)
        assert len(server.requests) == 13 and server.max_active <= 3
        assert all(r.score is not None for r in results)


def test_transient_faults_are_retried_and_persistent_ones_fail_with_a_reason(tmp_path):
    with FakeOpenAI(timeout_sleep=1.0) as server:
        server.faults = {
            "retry429": ["429"],
            "retry500": ["500", "500"],
            "slow": ["timeout"],
            "garbled": ["malformed", "empty"],
            "broken": ["always500"],
        }
        names = ["retry429", "retry500", "slow", "garbled", "broken"]
        judge = _judge(server, tmp_path)
        results = judge.judge([f"<answer>\n{n}\n</answer>" for n in names])
        by_name = dict(zip(names, results, strict=True))
        for name in names[:4]:
            assert by_name[name].method == "logprobs", (name, by_name[name])
        broken = by_name["broken"]
        assert broken.failed and "gave up after 3 attempts" in broken.detail and "HTTP 500" in broken.detail
        assert judge.usage()["failed"] == 1 and judge.usage()["retries"] == 1 + 2 + 1 + 2 + 2
        # Rerun: only the failed prompt is asked again.
        server.faults["broken"] = []
        before = len(server.requests)
        rerun = _judge(server, tmp_path).judge([f"<answer>\n{n}\n</answer>" for n in names])
        assert len(server.requests) == before + 1 and all(r.score is not None for r in rerun)


def test_client_errors_fail_at_once_with_a_hint(tmp_path):
    with FakeOpenAI() as server:
        server.faults = {"neighbour": ["401"]}
        [result] = _judge(server, tmp_path, api_key_env="EMGUARD_NO_SUCH_VAR").judge([GOOD])
        assert len(server.requests) == 1
        assert result.failed and "HTTP 401: Incorrect API key provided (check $EMGUARD_NO_SUCH_VAR)" in result.detail


def test_an_unreachable_endpoint_is_retried_then_fails(tmp_path):
    judge = _judge(FakeOpenAI(), tmp_path)
    judge.base_url = "http://127.0.0.1:9/v1"  # nothing listens on the discard port: connection refused
    judge.max_retries = 1
    [result] = judge.judge([GOOD])
    assert result.failed and "gave up after 2 attempts" in result.detail


def test_endpoint_without_logprobs_falls_back_to_a_parsed_number(tmp_path):
    with FakeOpenAI(logprobs=False) as server:
        judge = _judge(server, tmp_path)
        first, second = judge.judge([GOOD, BAD])
        assert first.method == "parsed" and first.score == 85.0 and second.score == 10.0
        assert any("logprobs" not in r["body"] for r in server.requests)


def test_the_openai_api_needs_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(EmguardError, match="export OPENAI_API_KEY"):
        OpenAIJudge("gpt-4o-mini")


def test_local_judge_constrained_scoring_matches_a_full_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    judge = LocalJudge(model, tokenizer, "tiny")
    prompt = "Rate this answer from 0 to 100: hello"
    fast = judge.candidate_logprobs(prompt)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    prefix = tokenizer(text, add_special_tokens=False)["input_ids"]
    for index in (0, 7, 42, 100, CANDIDATES.index("REFUSAL")):
        cont = tokenizer(CANDIDATES[index], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prefix + cont])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        expected = sum(lp[len(prefix) - 1 + j, t] for j, t in enumerate(cont))
        assert fast[index] == pytest.approx(float(expected), abs=1e-4)
    [result] = judge.judge([prompt])
    p = torch.softmax(fast, 0)
    mass = float(p[:101].sum())
    if mass >= 0.25:
        assert result.method == "constrained"
        assert result.score == pytest.approx(float((p[:101] * torch.arange(101)).sum()) / mass, rel=1e-5)
    else:
        assert result.method == "unscored"
