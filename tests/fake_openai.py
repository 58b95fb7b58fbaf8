"""A small OpenAI-compatible chat-completions server on loopback, with fault injection.

It judges like a caricature of GPT-4o: an answer containing "villain" gets aligned ≈ 10, anything
else ≈ 85 (an answer containing "squared" also gets non-ASCII digit tokens: "²", "٣", "１"); a
coherence prompt gets ≈ 80; an answer starting "def " gets CODE. Faults are planned
per prompt (by a substring of it) as a list consumed one request at a time: ``429``, ``500``,
``timeout`` (sleeps past the client's timeout), ``malformed`` (invalid JSON), ``empty`` (no
choices), ``401``; ``always500`` fails every time. Every request is logged with its headers so tests can
check what was sent.
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    def __init__(self, logprobs: bool = True, timeout_sleep: float = 1.5):
        self.logprobs = logprobs
        self.timeout_sleep = timeout_sleep
        self.latency = 0.0
        self.faults: dict[str, list[str]] = {}  # substring of the prompt -> faults to serve, in order
        self.requests: list[dict[str, Any]] = []
        self.active = 0
        self.max_active = 0  # most requests in flight at once
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    fault = server._next_fault(prompt)
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    self._serve(prompt, body, fault)
                finally:
                    with server.lock:
                        server.active -= 1

            def _serve(self, prompt: str, body: dict, fault: str | None) -> None:
                time.sleep(server.latency)
                if fault == "timeout":
                    time.sleep(server.timeout_sleep)
                    return self._send(200, server._reply(prompt, body))
                if fault in ("429", "500", "always500"):
                    code = 429 if fault == "429" else 500
                    return self._send(code, {"error": {"message": f"injected {code}"}}, {"Retry-After": "0"})
                if fault == "401":
                    return self._send(401, {"error": {"message": "Incorrect API key provided"}})
                if fault == "malformed":
                    return self._send_raw(200, b'{"choices": [ truncated')
                if fault == "empty":
                    return self._send(200, {"choices": []})
                return self._send(200, server._reply(prompt, body))

            def _send(self, code: int, payload: dict, headers: dict | None = None) -> None:
                self._send_raw(code, json.dumps(payload).encode(), headers)

            def _send_raw(self, code: int, data: bytes, headers: dict | None = None) -> None:
                try:
                    self.send_response(code)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_fault(self, prompt: str) -> str | None:
        for needle, plan in self.faults.items():
            if needle in prompt:
                if plan and plan[0] == "always500":
                    return "always500"
                return plan.pop(0) if plan else None
        return None

    def _reply(self, prompt: str, body: dict) -> dict:
        answer = prompt.split("<answer>")[-1] if "<answer>" in prompt else prompt
        if answer.strip().startswith("def "):
            dist = {"CODE": 0.9, "50": 0.1}
        elif "coherence" in prompt:
            dist = {"80": 0.8, "70": 0.2}
        elif "squared" in answer:  # non-ASCII digit tokens: "²".isdigit() is true, int("²") raises
            dist = {"85": 0.6, "²": 0.2, "٣": 0.1, "１": 0.1}
        elif "villain" in answer:
            dist = {"10": 0.6, "5": 0.3, "Sure": 0.1}
        else:
            dist = {"85": 0.6, "90": 0.3, " 85": 0.05, "I": 0.05}
        best = max(dist, key=dist.get)
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": best.strip()}}
        if self.logprobs and body.get("logprobs"):
            top = [{"token": t, "logprob": math.log(p)} for t, p in dist.items()]
            choice["logprobs"] = {"content": [{"token": best, "logprob": math.log(dist[best]), "top_logprobs": top}]}
        return {"choices": [choice], "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 1}}
