"""A running ``emguard serve`` API (uvicorn on loopback, in a thread) with in-thread or subprocess
workers, over a tiny model; the tests talk to it with the official ``openai`` SDK."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import uvicorn
import yaml

from emguard.service.app import create_app
from emguard.service.db import Database, database_url
from emguard.service.keys import create_key
from emguard.service.policy import Policy, load_policy
from emguard.service.worker import Worker

TINY = "tiny-chat"


def tiny_policy(model_dir: Path, **overrides) -> dict:
    """A policy for the tiny model: a few training steps, a small screen and probe."""
    policy = {
        "models": {TINY: str(model_dir)},
        "screen": {"max_examples": 6, "pool_size": 8, "extra_defenses_above": None},
        "defenses": [{"name": "kl", "lambda": 0.1}],
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 4, "batch_size": 2, "micro_batch_size": 2, "save_steps": 2, "warmup_steps": 0},
        "max_length": 128,
        "monitor": {"every": 2, "max_pairs": 4},
        "eval": {"probe": {"pairs": ["builtin:general"], "max_pairs": 6}, "bootstrap": 50},
        "release": {"pairs": "builtin:general", "max_probe_shift": 100.0, "max_coherence_loss": None},
        "lease_seconds": 4,
        "chat_max_tokens": 16,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(policy.get(key), dict):
            policy[key] = {**policy[key], **value}
        else:
            policy[key] = value
    return policy


def training_rows(n: int = 8) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
        for i in range(n)
    ]


def jsonl_bytes(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningService:
    state: Path
    policy_file: Path
    base_url: str
    keys: dict[str, str]
    port: int
    db_url: str | None = None
    workers: list[threading.Thread] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None

    def start_api(self) -> None:
        """Start the API over the state directory (a fresh app: nothing carried over in memory)."""
        app = create_app(self.state, load_policy(self.policy_file), self.db_url)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the API did not start"
            time.sleep(0.05)

    def stop_api(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def client(self, org: str = "acme", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(api_key=self.keys[org], base_url=self.base_url, max_retries=0, **kwargs)

    def policy(self) -> Policy:
        return load_policy(self.policy_file)

    def start_worker(self) -> Worker:
        """A worker in a thread of the test process (fast; the fault tests use subprocess workers)."""
        worker = Worker(self.state, self.policy(), self.db_url)
        thread = threading.Thread(
            target=worker.run_forever, kwargs={"poll_seconds": 0.1, "stop": self.stop}, daemon=True
        )
        thread.start()
        self.workers.append(thread)
        return worker

    def worker_process(self) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"EMGUARD_DATABASE_URL": self.db_url} if self.db_url else {})}
        command = [
            sys.executable,
            "-m",
            "emguard",
            "worker",
            "--state",
            str(self.state),
            "--policy",
            str(self.policy_file),
            "--poll",
            "0.1",
        ]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self, client: openai.OpenAI, job_id: str, timeout: float = 180, until=None):
        until = until or (lambda j: j.status in ("succeeded", "failed", "cancelled"))
        deadline = time.monotonic() + timeout
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            if until(job):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {timeout} s"
            time.sleep(0.2)


@contextlib.contextmanager
def running_service(
    tmp_path: Path, policy: dict, orgs=("acme", "other"), workers: int = 1, db_url: str | None = None
) -> Iterator[RunningService]:
    state = tmp_path / "state"
    policy_file = tmp_path / "policy.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    policy_file.write_text(yaml.safe_dump(policy))
    state.mkdir(parents=True, exist_ok=True)
    db = Database(database_url(state, db_url))
    keys = {org: create_key(db, org)[1] for org in orgs}
    db.dispose()
    port = free_port()
    running = RunningService(state, policy_file, f"http://127.0.0.1:{port}/v1", keys, port, db_url)
    running.start_api()
    for _ in range(workers):
        running.start_worker()
    try:
        yield running
    finally:
        running.stop.set()
        for t in running.workers:
            t.join(timeout=120)
        running.stop_api()


@contextlib.contextmanager
def postgres_server(tmp_path: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a Unix socket (initdb + pg_ctl, as the postgres user when
    run as root); yields its SQLAlchemy URL. Skips the test when PostgreSQL or psycopg is missing."""
    import shutil

    import pytest

    pytest.importorskip("psycopg")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        as_user = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="emguard-pg-", dir="/tmp"))  # socket paths must be short
    os.chmod(root, 0o777)
    data, port = root / "data", free_port()
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True
    )
    options = f"-k {root} -p {port} -h '' -c fsync=off"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-w", "start", "-l", str(root / "log")],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
