"""Serve a GGUF model as an OpenAI-compatible judge endpoint on loopback (llama-cpp-python's server).

For judging without a hosted API, and for emguard's own tests and benchmarks::

    with llama_server(builtin_gguf_path(BUILTIN_MODELS["smollm2-135m-instruct"]), log) as base_url:
        judge = OpenAIJudge("local-gguf", base_url=base_url)

Needs ``pip install 'emguard[judge-server]'`` (``make judge-server``), which compiles llama.cpp.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from emguard.errors import EmguardError

MODEL_ALIAS = "local-gguf"


def llama_server_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None


@contextlib.contextmanager
def llama_server(gguf: Path, log_path: Path, n_ctx: int = 2048, timeout_s: float = 120.0) -> Iterator[str]:
    """Start the server on a free loopback port, wait until it answers, yield its base URL, stop it.

    The server's output goes to ``log_path`` (a pipe could fill up and block it).
    """
    if not llama_server_available():
        raise EmguardError("llama-cpp-python's server is not installed: pip install 'emguard[judge-server]'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v1"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(n_ctx), "--model_alias", MODEL_ALIAS]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    urllib.request.urlopen(f"{base_url}/models", timeout=2).read()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise EmguardError(f"the llama server did not start; see {log_path}") from None
                    time.sleep(0.5)
            yield base_url
        finally:
            process.terminate()
            process.wait(timeout=30)
