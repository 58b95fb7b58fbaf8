"""``emguard serve``: the API (uvicorn) in this process and local workers in their own processes."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


DATABASE_URL_ENV = "EMGUARD_DATABASE_URL"  # a URL may hold a password: never on a command line


def worker_command(state: Path, policy: Path | None) -> list[str]:
    command = [sys.executable, "-m", "emguard", "worker", "--state", str(state)]
    if policy is not None:
        command += ["--policy", str(policy)]
    return command


def serve(host: str, port: int, state: Path, policy_file: Path | None, db_url: str | None, workers: int) -> None:
    import uvicorn

    from emguard.service.app import create_app
    from emguard.service.policy import load_policy

    policy = load_policy(policy_file)  # a bad policy fails here, before anything starts
    state.mkdir(parents=True, exist_ok=True)
    app = create_app(state, policy, db_url)
    # Workers inherit the environment: the database URL and the judge's key travel there.
    env = {**os.environ, **({DATABASE_URL_ENV: db_url} if db_url else {})}
    children = [subprocess.Popen(worker_command(state, policy_file), env=env) for _ in range(workers)]
    log.info("emguard serve: %d local worker(s); state in %s", workers, state)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        for child in children:
            child.terminate()
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=30)
