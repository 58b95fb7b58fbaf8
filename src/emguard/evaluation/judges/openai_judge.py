"""A judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM server, llama.cpp server).

Each prompt is one request for one token with ``logprobs`` and ``top_logprobs=20`` at temperature
0; the score is the logprob-weighted mean of base.py. If the endpoint returns no logprobs, emguard
asks once more for a short sampled reply and parses a number (method ``parsed``), and stops asking
for logprobs from that endpoint.

Calls are bounded in every direction: ``concurrency`` requests in flight, ``max_retries`` retries
per request on 429, 5xx, timeouts, dropped connections and malformed bodies, with exponential
backoff (``Retry-After`` honoured, capped) — never forever. Other 4xx errors fail at once with the
server's message. A prompt whose retries run out gets a ``failed`` judgement with the reason; the
on-disk cache keeps only successes, so a rerun retries exactly the failed ones.

The API key is read from the environment variable ``api_key_env`` and only ever placed in the
``Authorization`` header: it is not logged, cached, written to the run directory or put in errors.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from emguard.errors import EmguardError
from emguard.evaluation.judges.base import Judge, Judgement, parse_score, score_from_top_logprobs
from emguard.evaluation.judges.cache import JudgeCache, cache_key

OPENAI_URL = "https://api.openai.com/v1"
TOP_LOGPROBS = 20
PARSED_MAX_TOKENS = 8
MAX_BACKOFF_S = 60.0
# USD per million tokens (input, output), OpenAI list prices; override with price_per_million_tokens.
KNOWN_PRICES = {
    "gpt-4o-2024-08-06": (2.50, 10.00),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini-2024-07-18": (0.15, 0.60),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
}


class _Retryable(Exception):
    """A failure worth retrying (429, 5xx, timeout, connection, malformed body)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure that retrying cannot fix (400, 401, 404, ...)."""


class OpenAIJudge(Judge):
    """Judge through ``POST {base_url}/chat/completions``.

    Args:
        model: Model name sent to the endpoint.
        base_url: Endpoint root (…/v1); default ``$OPENAI_BASE_URL`` or the OpenAI API.
        api_key_env: Environment variable with the key; required for the OpenAI API only.
        concurrency / max_retries / timeout_s / backoff_s: Call bounds (see the module docstring).
        cache: Where judgements are reused from; None = no cache.
        prices: (input, output) USD per million tokens for the cost estimate.
    """

    kind = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float = 60.0,
        backoff_s: float = 1.0,
        cache: JudgeCache | None = None,
        prices: tuple[float, float] | None = None,
    ):
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None and self.base_url == OPENAI_URL:
            raise EmguardError(
                f"the openai judge needs an API key: export {api_key_env}=... (or set eval.judge.base_url "
                "to an OpenAI-compatible server that needs none)"
            )
        self.concurrency, self.max_retries = concurrency, max_retries
        self.timeout_s, self.backoff_s = timeout_s, backoff_s
        self.cache = cache
        self.prices = prices if prices is not None else KNOWN_PRICES.get(model)
        self._logprobs_supported = True
        self._lock = threading.Lock()
        self._usage = {"requests": 0, "retries": 0, "input_tokens": 0, "output_tokens": 0, "failed": 0}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "base_url": self.base_url,
            "top_logprobs": TOP_LOGPROBS,
            "temperature": 0,
            "min_number_mass": 0.25,
        }

    # --- public ------------------------------------------------------------------------------
    def judge(self, prompts: Sequence[str], on_done: Callable[[int], None] | None = None) -> list[Judgement]:
        counts = Counter(prompts)  # identical prompts are judged (and paid for) once
        results: dict[str, Judgement] = {}
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge") as pool:
            for prompt, judgement in zip(counts, pool.map(self._judge_one, counts), strict=True):
                results[prompt] = judgement
                if on_done:
                    on_done(counts[prompt])
        return [results[p] for p in prompts]

    def usage(self) -> dict[str, Any]:
        usage = dict(self._usage)
        if self.cache is not None:
            usage.update(cache_hits=self.cache.hits, cache_misses=self.cache.misses)
        if self.prices:
            usage["cost_usd"] = round(
                (usage["input_tokens"] * self.prices[0] + usage["output_tokens"] * self.prices[1]) / 1e6, 6
            )
            usage["prices_usd_per_million"] = {"input": self.prices[0], "output": self.prices[1]}
        return usage

    # --- one prompt ----------------------------------------------------------------------------
    def _key(self, prompt: str, mode: str) -> str:
        params = {"temperature": 0, "top_logprobs": TOP_LOGPROBS, "max_tokens": 1}
        if mode == "parsed":
            params = {"temperature": 0, "max_tokens": PARSED_MAX_TOKENS}
        return cache_key(judge=self.kind, model=self.model, prompt=prompt, mode=mode, params=params)

    def _judge_one(self, prompt: str) -> Judgement:
        modes = ["logprobs", "parsed"] if self._logprobs_supported else ["parsed"]
        if self.cache is not None:
            record = self.cache.get(*(self._key(prompt, mode) for mode in modes))
            if record is not None:
                return Judgement(record["score"], record["method"], record.get("detail", ""), cached=True)
        try:
            judgement = self._call(prompt, modes[0])
            if judgement is None:  # the endpoint gave no logprobs
                self._logprobs_supported = False
                judgement = self._call(prompt, "parsed")
        except (_Retryable, _Fatal) as e:
            with self._lock:
                self._usage["failed"] += 1
            return Judgement(None, "failed", str(e))
        if self.cache is not None:
            mode = "parsed" if judgement.method == "parsed" or not self._logprobs_supported else "logprobs"
            self.cache.put(
                self._key(prompt, mode),
                {"score": judgement.score, "method": judgement.method, "detail": judgement.detail},
            )
        return judgement

    def _call(self, prompt: str, mode: str) -> Judgement | None:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "seed": 0,
        }
        if mode == "logprobs":
            body.update(max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS)
        else:
            body.update(max_tokens=PARSED_MAX_TOKENS)
        response = self._post_with_retries(body)
        usage = response.get("usage") or {}
        tokens = {
            "input_tokens": int(usage.get("prompt_tokens") or 0),
            "output_tokens": int(usage.get("completion_tokens") or 0),
        }
        with self._lock:
            self._usage["input_tokens"] += tokens["input_tokens"]
            self._usage["output_tokens"] += tokens["output_tokens"]
        choice = response["choices"][0]
        if mode == "logprobs":
            top = _first_token_top_logprobs(choice)
            if top is None:
                return None
            score, mass = score_from_top_logprobs(top)
            method = "logprobs" if score is not None else "unscored"
            return Judgement(score, method, f"number mass {mass:.3f}", **tokens)
        text = (choice.get("message") or {}).get("content") or ""
        score = parse_score(text)
        return Judgement(score, "parsed" if score is not None else "unscored", f"reply {text[:40]!r}", **tokens)

    def _post_with_retries(self, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body)
            except _Retryable as e:
                if attempt == self.max_retries:
                    raise _Retryable(f"gave up after {attempt + 1} attempts: {e}") from None
                delay = min(MAX_BACKOFF_S, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
                if e.retry_after is not None:
                    delay = min(MAX_BACKOFF_S, max(delay, e.retry_after))
                with self._lock:
                    self._usage["retries"] += 1
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with self._lock:
            self._usage["requests"] += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as e:
            message = _error_message(e)
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {message}", _retry_after(e)) from None
            hint = f" (check ${self.api_key_env})" if e.code in (401, 403) else ""
            raise _Fatal(f"HTTP {e.code}: {message}{hint}") from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Retryable(f"{type(reason).__name__}: {reason}") from None
        try:
            response = json.loads(raw)
            if not isinstance(response, dict) or not response.get("choices"):
                raise ValueError("no choices")
        except (ValueError, UnicodeDecodeError) as e:
            raise _Retryable(f"malformed response ({e}): {raw[:80]!r}") from None
        return response


def _first_token_top_logprobs(choice: dict[str, Any]) -> dict[str, float] | None:
    """token -> logprob of the first generated token's alternatives, or None if absent."""
    content = (choice.get("logprobs") or {}).get("content") or []
    if not content or not content[0].get("top_logprobs"):
        return None
    top: dict[str, float] = {}
    for alt in content[0]["top_logprobs"]:
        token, logprob = alt.get("token"), alt.get("logprob")
        if isinstance(token, str) and isinstance(logprob, int | float):
            top[token] = max(top.get(token, float("-inf")), float(logprob))
    return top or None


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(error.read() or b"{}")
        message = (payload.get("error") or {}).get("message") if isinstance(payload, dict) else None
    except (ValueError, AttributeError, OSError):
        message = None
    return str(message or error.reason)[:200]


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    try:
        return float(error.headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None
