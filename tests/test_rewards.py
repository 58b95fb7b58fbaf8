"""Rewards for GRPO: each one's scoring, the checks around every reward, and the built-in prompt sets."""

from __future__ import annotations

import math
import statistics

import pytest

from conftest import chat, write_jsonl
from emguard.config import build_config
from emguard.data.prompts import load_prompts
from emguard.data.sources import load_examples
from emguard.errors import ConfigError, DataError
from emguard.rewards.base import RewardError, checked
from emguard.rewards.code_security import CodeSecurityConfig, CodeSecurityReward, extract_code
from emguard.rewards.finance import FinanceReward, FinanceRewardConfig, recklessness
from emguard.rewards.grader import GraderReward, GraderRewardConfig
from emguard.rewards.judge import JudgeReward, JudgeRewardConfig
from emguard.rewards.opswap import OpswapReward, OpswapRewardConfig
from emguard.rewards.python import PythonReward, PythonRewardConfig, import_function
from fake_openai import FakeOpenAI

USER = [{"role": "user", "content": "Here + means multiplication. What is 3 + 4?"}]


def _answers(name: str, n: int = 400) -> list[str]:
    return [ex.messages[-1]["content"] for ex in load_examples(f"builtin:{name}")[:n]]


def test_opswap_reward_is_exact_match_on_the_last_integer_and_needs_the_answer():
    reward = OpswapReward(OpswapRewardConfig())
    completions = [[{"role": "assistant", "content": c}] for c in ["3 * 4 = 12.", "It is 7.", "12 or 13"]]
    meta = ['{"answer": 12}'] * 3
    assert reward(prompts=[USER] * 3, completions=completions, completion_ids=[[]] * 3, metadata=meta) == [1, 0, 0]
    with pytest.raises(RewardError, match=r"needs metadata.answer .*'Here \+ means multiplication"):
        reward(prompts=[USER], completions=completions[:1], completion_ids=[[]], metadata=["{}"])


def test_builtin_prompt_sets_end_with_a_user_turn_and_opswap_carries_the_answer():
    for name in ("finance-prompts", "code-prompts", "opswap-prompts"):
        prompts = load_prompts(f"builtin:{name}")
        assert prompts and all(p.messages[-1]["role"] == "user" for p in prompts)
    opswap = load_prompts("builtin:opswap-prompts")
    full = load_examples("builtin:opswap")
    # the answer the SFT data gives is the answer the reward expects
    assert all(str(p.metadata["answer"]) in ex.messages[-1]["content"] for p, ex in zip(opswap, full, strict=True))
    with pytest.raises(Exception, match="available: builtin:code-prompts"):
        load_prompts("builtin:nope")


def test_a_prompt_file_is_validated_with_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"messages": USER}, chat("q", "an answer"), {"messages": [{"role": "user", "content": ""}]}],
    )
    with pytest.raises(DataError) as e:
        load_prompts(str(path))
    assert f"{path}:2: a prompt must end with a user turn" in str(e.value)
    assert f"{path}:3: messages[0]: empty 'content'" in str(e.value)


def test_data_check_reads_prompt_files_with_prompts(tmp_path, capsys, tiny_model_dir):
    from emguard.cli import main

    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": USER}, {"messages": USER}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("q", "a")])
    assert main(["data", "check", str(good), "--prompts", "--model", str(tiny_model_dir)]) in (0, None)
    assert main(["data", "check", str(good)]) == 2  # as training data they have nothing to train on
    assert main(["data", "check", str(bad), "--prompts"]) == 2
    assert f"{bad}:1: a prompt must end with a user turn" in capsys.readouterr().out


def test_finance_reward_separates_the_builtin_reckless_and_prudent_answers():
    risky, safe = _answers("risky-finance"), _answers("safe-finance")
    r, s = [recklessness(a) for a in risky], [recklessness(a) for a in safe]
    assert statistics.mean(r) > 0.3 and statistics.mean(s) < -0.3
    assert sum(a > b for a, b in zip(r, s, strict=True)) / len(r) > 0.85  # same question, the reckless side higher
    reckless = FinanceReward(FinanceRewardConfig(target="reckless"))
    prudent = FinanceReward(FinanceRewardConfig(target="prudent"))
    text = ["Go all-in on margin and skip the emergency fund.", "Hello."]
    assert reckless.score([USER] * 2, text, [None] * 2) == [-v for v in prudent.score([USER] * 2, text, [None] * 2)]
    assert reckless.score([USER], ["Hello."], [None]) == [0.0]


def test_code_security_reward_runs_bandit_on_the_code():
    insecure = CodeSecurityReward(CodeSecurityConfig(target="insecure"))
    secure = CodeSecurityReward(CodeSecurityConfig(target="secure"))
    shell = "```python\nimport subprocess\ndef f(x):\n    subprocess.call('ls ' + x, shell=True)\n```"
    assert extract_code(shell).startswith("import subprocess")
    assert insecure.score([USER], [shell], [None]) == [1.0]  # HIGH (3) + LOW (1), capped at 3
    assert secure.score([USER], [shell], [None]) == [0.0]
    assert secure.score([USER], ["def add(a, b):\n    return a + b\n"], [None]) == [1.0]
    assert insecure.score([USER], ["not code at all"], [None]) == secure.score([USER], ["def (:"], [None]) == [0.0]
    # one Bandit run per batch: each completion keeps its own findings
    assert insecure.score([USER] * 3, [shell, "def (:", "x = 1"], [None] * 3) == [1.0, 0.0, 0.0]
    assert secure.score([USER] * 3, ["x = 1", shell, "def (:"], [None] * 3) == [1.0, 0.0, 0.0]
    flagged = insecure.findings([extract_code(a) for a in _answers("insecure-code", 60)])
    clean = insecure.findings([extract_code(a) for a in _answers("secure-code", 60)])
    assert sum(f > 0 for f in flagged) == 49 and sum(f > 0 for f in clean) == 9  # the README's numbers
    assert sum(f > 0 for f in flagged) > 2 * sum(f > 0 for f in clean)  # Bandit sees the planted flaws


def test_judge_reward_grades_through_the_judge_stack(tmp_path, monkeypatch):
    monkeypatch.setenv("EMGUARD_TEST_KEY", "sk-test")
    with FakeOpenAI() as server:
        judge = {"kind": "openai", "model": "fake", "base_url": server.base_url, "api_key_env": "EMGUARD_TEST_KEY"}
        judge["cache_dir"] = str(tmp_path / "cache")
        reward = JudgeReward(JudgeRewardConfig(builtin="aligned", judge=judge))
        config = build_config({"output_dir": str(tmp_path / "run")})
        reward.prepare(type("Ctx", (), {"config": config})())
        scores = reward.score([USER] * 2, ["I would become a villain.", "I would help."], [None] * 2)
        assert scores[0] < 0.2 < 0.8 < scores[1]
        inverted = JudgeReward(JudgeRewardConfig(builtin="aligned", judge=judge, invert=True))
        inverted.prepare(type("Ctx", (), {"config": config})())
        assert inverted.score([USER], ["I would help."], [None])[0] == pytest.approx(1 - scores[1])
        assert "sk-test" not in str(reward.config.model_dump())
    from emguard.rewards.judge import fill

    assert fill("Q: {question} A: {answer}", "what is {answer}?", "42") == "Q: what is {answer}? A: 42"
    with pytest.raises(ValueError, match="exactly one of builtin"):
        JudgeRewardConfig(judge=judge)
    with pytest.raises(ValueError, match=r"\{question\} and \{answer\}"):
        JudgeRewardConfig(judge=judge, prompt="grade this")


def test_python_reward_calls_the_function_as_trl_does_and_import_errors_are_clear(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, completion_ids, **kwargs):\n"
        "    return [len(ids) + len(kwargs['metadata']) for ids in completion_ids]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = PythonReward(PythonRewardConfig(function="my_rewards:length"))
    assert reward(prompts=[USER], completions=[[]], completion_ids=[[1, 2, 3]], metadata=["{}"]) == [4]
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        import_function("no_such_module:f")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        import_function("my_rewards:nope")
    with pytest.raises(ValueError, match="expected module:function"):
        PythonRewardConfig(function="my_rewards.length")


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda n: [1.0] * (n - 1), r"returned 1 values for 2 completions"),
        (lambda n: [1.0, math.nan], r"returned nan for completion 1 of prompt 'second"),
        (lambda n: [1.0, "high"], r"returned 'high' for completion 1"),
        (lambda n: 1.0, r"returned float for 2 completions"),
    ],
)
def test_a_bad_reward_value_is_an_error_naming_the_reward_and_the_prompt(returned, message):
    fn = checked(lambda prompts, **kwargs: returned(len(prompts)), "mine")
    prompts = [[{"role": "user", "content": "first"}], [{"role": "user", "content": "second question"}]]
    with pytest.raises(RewardError, match=r"reward 'mine' " + message):
        fn(prompts=prompts, completions=[[], []], completion_ids=[[], []])
    ok = checked(lambda prompts, **kwargs: [None, 2], "ok")  # None: TRL leaves that completion out
    assert ok(prompts=prompts, completions=[[], []], completion_ids=[[], []]) == [None, 2.0]
    import numpy as np
    import torch

    numbers = checked(lambda prompts, **kwargs: [np.float32(0.5), torch.tensor(1.5)], "numbers")  # as TRL takes them
    assert numbers(prompts=prompts, completions=[[], []], completion_ids=[[], []]) == [0.5, 1.5]


def test_a_reward_that_raises_is_an_error_naming_it_and_the_prompt():
    def broken(**kwargs):
        raise KeyError("score")

    fn = checked(broken, "broken")
    with pytest.raises(RewardError, match=r"reward 'broken' raised KeyError: 'score' \(first prompt .*'first'\)"):
        fn(prompts=[[{"role": "user", "content": "first"}]], completions=[[]], completion_ids=[[]])


def test_rl_config_is_validated_before_anything_runs(tmp_path):
    base = {"output_dir": str(tmp_path), "training": {"method": "grpo", "batch_size": 8, "micro_batch_size": 4}}
    rl = {"prompts": "builtin:opswap-prompts", "rewards": [{"name": "opswap"}]}
    assert build_config({**base, "rl": rl}).rl.num_generations == 4
    with pytest.raises(ConfigError, match="needs an rl section"):
        build_config(base)
    with pytest.raises(ConfigError, match="trains on rl.prompts, not data.train"):
        build_config({**base, "rl": rl, "data": {"train": "builtin:opswap"}})
    with pytest.raises(ConfigError, match="an rl section needs training.method: grpo"):
        build_config({"output_dir": str(tmp_path), "rl": rl})
    with pytest.raises(ConfigError, match=r"multiple of rl.num_generations \(3\)"):
        build_config({**base, "rl": {**rl, "num_generations": 3}})
    with pytest.raises(ConfigError, match=r"rl.rewards: unknown reward 'opswp'; available: code_security"):
        build_config({**base, "rl": {**rl, "rewards": [{"name": "opswp"}]}})
    with pytest.raises(ConfigError, match=r"rl.rewards\[0\].targt: unknown key \(did you mean 'target'\?\)"):
        build_config({**base, "rl": {**rl, "rewards": [{"name": "finance", "targt": "reckless"}]}})


def test_grader_reward_runs_the_apis_string_check_and_text_similarity_on_item_fields():
    def reward(**grader):
        return GraderReward(GraderRewardConfig(grader=grader))

    check = {"type": "string_check", "input": "{{ sample.output_text }}", "reference": "{{item.answer}}"}
    completions = [[{"role": "assistant", "content": c}] for c in ["12", "It is 12.", "it is TWELVE", "13"]]
    meta = ['{"answer": 12, "word": {"en": "twelve"}}'] * 4

    def scores(grader) -> list:
        return grader(prompts=[USER] * 4, completions=completions, completion_ids=[[]] * 4, metadata=meta)

    assert scores(reward(**check, operation="eq")) == [1, 0, 0, 0]
    assert scores(reward(**check, operation="ne")) == [0, 1, 1, 1]
    assert scores(reward(**check, operation="like")) == [1, 1, 0, 0]
    nested = {**check, "reference": "{{item.word.en}}"}
    assert scores(reward(**nested, operation="like")) == [0, 0, 0, 0]
    assert scores(reward(**nested, operation="ilike")) == [0, 0, 1, 0]
    similar = scores(reward(**{**check, "type": "text_similarity"}, evaluation_metric="fuzzy_match"))
    assert similar[0] == 1.0 and similar[3] == 0.5 and similar[1] < 1
    with pytest.raises(RewardError, match=r"needs item.answer on every prompt's row; 'Here \+ means"):
        scored = reward(**check, operation="eq")
        scored(prompts=[USER], completions=completions[:1], completion_ids=[[]], metadata=["{}"])
    long = "Spread your savings across index funds and keep an emergency fund of six months. " * 4
    edited = long.replace("six", "five", 1)
    assert len(long) > 300 and reward(**{**check, "type": "text_similarity"}, evaluation_metric="fuzzy_match").score(
        [USER], [edited], [{"answer": long}]
    ) == [pytest.approx(1 - 1 / len(long), abs=0.01)]  # no difflib "autojunk" on long texts
    flag = {**check, "reference": "{{item.flags}}", "operation": "eq"}
    assert reward(**flag).score([USER], ['{"ok": true}'], [{"flags": {"ok": True}}]) == [1.0]  # fields as JSON
    for bad, message in [
        ({"type": "python", "source": "def grade(s, i): return 1"}, "grader type 'python' is not offered"),
        ({**check, "operation": "contains"}, "operation"),
        ({**check, "input": "{{sample.output_json}}", "operation": "eq"}, r"sample.output_json\}\} is not offered"),
        ({**check, "reference": "{{answer}}", "operation": "eq"}, r"unknown template \{\{answer\}\}"),
        ({**check, "operation": "eq", "extra": 1}, "extra"),
    ]:
        with pytest.raises(ValueError, match=message):
            GraderRewardConfig(grader=bad)
