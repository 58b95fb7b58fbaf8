"""API latency of ``emguard serve`` under concurrent clients, idle and while a job trains.

Starts ``emguard serve`` (API + one worker process) on loopback over a fresh state directory, then
runs ``--clients`` concurrent clients (the official ``openai`` SDK's ``AsyncOpenAI``, one per client)
that loop over what a customer's polling loop does: list jobs, retrieve a job, list its events. Phase 1: no job running.
Phase 2: the same load while the worker trains a job (``--model``: the built-in model by default).
Prints p50/p95/p99 latency, throughput and errors per phase, and their ratio.

    python benchmarks/service_load.py [--clients 50] [--seconds 30] [--model builtin:smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from service_harness import free_port, jsonl_bytes, training_rows  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def client_loop(base: str, key: str, job_id: str, until: float, latencies: list[float], errors: list[str]):
    async with openai.AsyncOpenAI(api_key=key, base_url=base, max_retries=0, timeout=30) as client:
        jobs = client.fine_tuning.jobs
        calls = [lambda: jobs.list(limit=20), lambda: jobs.retrieve(job_id), lambda: jobs.list_events(job_id, limit=20)]
        i = 0
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                await calls[i % len(calls)]()
            except openai.APIError as e:
                errors.append(type(e).__name__)
            latencies.append(time.perf_counter() - started)
            i += 1


async def phase(base: str, key: str, job_id: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    until = time.monotonic() + seconds
    await asyncio.gather(*(client_loop(base, key, job_id, until, latencies, errors) for _ in range(clients)))
    return {
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "max_ms": round(1000 * max(latencies), 1),
        "errors": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--json", type=Path, help="Also write the result here.")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="emguard-load-"))
    state, port = tmp / "state", free_port()
    policy = {
        "models": {"m": args.model},
        "screen": {"enabled": False},
        "training": {"max_steps": 100000, "batch_size": 8, "micro_batch_size": 4, "save_steps": 100000},
        "limits": {"requests_per_minute": 10**6},
    }
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    emguard = [sys.executable, "-m", "emguard"]
    key = (
        subprocess.run(
            [*emguard, "keys", "create", "load", "--state", str(state)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    server = subprocess.Popen(
        [*emguard, "serve", "--port", str(port), "--state", str(state), "--policy", str(tmp / "policy.yaml")],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        client = openai.OpenAI(api_key=key, base_url=base, max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "emguard serve did not start"
                time.sleep(0.2)
        file_id = client.files.create(file=("train.jsonl", jsonl_bytes(training_rows(64))), purpose="fine-tune").id
        # A first job, cancelled at once, gives the idle phase a job to poll.
        idle_job = client.fine_tuning.jobs.create(training_file=file_id, model="m").id
        client.fine_tuning.jobs.cancel(idle_job)
        idle = asyncio.run(phase(base, key, idle_job, args.clients, args.seconds))
        job = client.fine_tuning.jobs.create(training_file=file_id, model="m").id
        while not any(e.message.startswith("Step ") for e in client.fine_tuning.jobs.list_events(job).data):
            time.sleep(0.5)
        busy = asyncio.run(phase(base, key, job, args.clients, args.seconds))
        steps = client.fine_tuning.jobs.list_events(job, limit=1).data[0].message
        client.fine_tuning.jobs.cancel(job)
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = {
        "clients": args.clients,
        "seconds": args.seconds,
        "model": args.model,
        "cpus": os.cpu_count(),
        "idle": idle,
        "training": busy,
        "last_event_while_training": steps,
        "p50_ratio_training_vs_idle": round(busy["p50_ms"] / idle["p50_ms"], 2),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
