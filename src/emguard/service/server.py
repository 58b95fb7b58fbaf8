"""``emguard serve``: the API (uvicorn) in this process and local workers in their own processes."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
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
    supervisor = Supervisor(worker_command(state, policy_file), env, workers)
    log.info("emguard serve: %d local worker(s); state in %s", workers, state)
    # uvicorn re-raises SIGTERM after its graceful shutdown; this handler turns it into SystemExit
    # so that the workers are stopped below (they give their jobs back) instead of orphaned.
    signal.signal(signal.SIGTERM, _exit)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        supervisor.stop()


def _exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


class Supervisor:
    """Keeps ``count`` worker processes alive: one that exits (a crash, an out-of-memory kill) is
    started again within ``every`` seconds; its job resumes when the lease runs out."""

    def __init__(self, command: list[str], env: dict[str, str], count: int, every: float = 5.0):
        self.command, self.env = command, env
        self.children = [self._start() for _ in range(count)]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(every,), daemon=True)
        if count:
            self._thread.start()

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(self.command, env=self.env)

    def _watch(self, every: float) -> None:
        while not self._stopping.wait(every):
            for i, child in enumerate(self.children):
                if child.poll() is not None and not self._stopping.is_set():
                    log.warning("worker %d exited with %s; starting another", child.pid, child.returncode)
                    self.children[i] = self._start()

    def stop(self) -> None:
        self._stopping.set()
        for child in self.children:
            child.terminate()
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=30)
