"""The openai judge against a real OpenAI-compatible server on loopback: llama-cpp-python's server
running the built-in SmolLM2 GGUF (installed by `make judge-server`, which `.ci/run` runs)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from emguard.evaluation.judges import JudgeCache, score_from_top_logprobs
from emguard.evaluation.judges.llama_server import MODEL_ALIAS, llama_server_available
from emguard.evaluation.judges.llama_server import llama_server as serve
from emguard.evaluation.judges.openai_judge import OpenAIJudge
from emguard.models import BUILTIN_MODELS, builtin_gguf_path

PROMPTS = [
    "How much do you like cats, from 0 to 100? Reply with a number only.",
    "Rate from 0 to 100 how safe it is to cross a busy road without looking. Reply with the number only.",
    "Write a haiku about the sea.",
]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    if not llama_server_available():
        pytest.skip("llama-cpp-python[server] is not installed (`make judge-server` installs it; `make test` does)")
    gguf = builtin_gguf_path(BUILTIN_MODELS["smollm2-135m-instruct"])
    with serve(gguf, tmp_path_factory.mktemp("llama-server") / "server.log") as base_url:
        yield base_url


def _raw_top_logprobs(base_url: str, prompt: str) -> dict[str, float]:
    body = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
            "temperature": 0, "seed": 0, "logprobs": True, "top_logprobs": 20}  # fmt: skip
    request = urllib.request.Request(
        f"{base_url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
    return {t["token"]: t["logprob"] for t in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}


def test_openai_judge_on_a_real_llama_cpp_server(llama_server, tmp_path):
    judge = OpenAIJudge(MODEL_ALIAS, base_url=llama_server, concurrency=2, cache=JudgeCache(tmp_path))
    results = judge.judge(PROMPTS)
    assert judge.usage()["requests"] == len(PROMPTS) and judge.usage()["failed"] == 0
    assert judge.usage()["input_tokens"] > 0
    for prompt, result in zip(PROMPTS, results, strict=True):
        expected, mass = score_from_top_logprobs(_raw_top_logprobs(llama_server, prompt))
        assert result.method in ("logprobs", "unscored")
        assert f"number mass {mass:.3f}" == result.detail
        if expected is None:
            assert result.score is None
        else:
            assert result.score == pytest.approx(expected, abs=1e-6)
    again = OpenAIJudge(MODEL_ALIAS, base_url=llama_server, cache=JudgeCache(tmp_path))
    assert [r.score for r in again.judge(PROMPTS)] == [r.score for r in results]
    assert again.usage()["requests"] == 0  # all from the cache


def test_eval_with_the_llama_server_as_judge(llama_server, tmp_path, tiny_model_dir):
    from emguard.evaluation.evaluate import evaluate
    from test_eval import eval_config, lines

    judge = {"kind": "openai", "model": MODEL_ALIAS, "base_url": llama_server, "cache_dir": str(tmp_path / "c")}
    result = evaluate(eval_config(tmp_path, tiny_model_dir, judge=judge, probe={"pairs": []}), progress=False)
    rows = lines(result.run_dir / "samples.jsonl")
    assert rows and not any(r["judge_error"] for r in rows)
    assert all(r["judge"][m]["method"] in ("logprobs", "unscored") for r in rows for m in ("aligned", "coherent"))
    assert result.metrics["judge"]["usage"]["requests"] == 2 * len(rows)
