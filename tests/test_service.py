"""``emguard serve`` driven by the official ``openai`` SDK on loopback, as a customer would, over a tiny model."""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time

import openai
import pytest
import yaml
from safetensors.torch import load_file

from emguard.rundir import CHECKPOINT_DONE
from emguard.service import jobs
from emguard.service.db import Database, Job, database_url
from emguard.service.keys import create_key
from service_harness import TINY, jsonl_bytes, postgres_server, running_service, tiny_policy, training_rows


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    with postgres_server(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """None (SQLite in the state directory) or a fresh database on a throwaway PostgreSQL server."""
    if request.param == "sqlite":
        return None
    from sqlalchemy import create_engine, text

    base = request.getfixturevalue("postgres")
    name = f"t{secrets.token_hex(6)}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return base.replace("/postgres?", f"/{name}?")


def upload(client, rows=None, name="train.jsonl"):
    return client.files.create(file=(name, jsonl_bytes(rows or training_rows())), purpose="fine-tune")


def test_customer_journey_with_the_sdk(tmp_path, tiny_model_dir, db_url):
    with running_service(tmp_path, tiny_policy(tiny_model_dir), db_url=db_url) as svc:
        client = svc.client()
        f = upload(client)
        assert f.purpose == "fine-tune" and f.bytes > 0 and client.files.retrieve(f.id).filename == "train.jsonl"
        assert client.files.content(f.id).read() == jsonl_bytes(training_rows())
        validation = upload(client, training_rows(3), name="valid.jsonl")
        job = client.fine_tuning.jobs.create(
            training_file=f.id,
            validation_file=validation.id,
            model=TINY,
            seed=3,
            suffix="demo",
            hyperparameters={"n_epochs": 1},
        )
        assert job.status == "queued" and job.seed == 3
        client.files.delete(f.id)  # the job trains on its own copy
        job = svc.wait(client, job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model.startswith(f"ft:{TINY}:acme:demo:") and job.trained_tokens > 0

        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        order = [
            "Created fine-tuning job",
            "Validating training file",
            "Screen: risk score",
            "Fine-tuning started",
            "Step 1/4",
            "Monitor at step 2: probe shift",
            "Step 4/4",
            "Fine-tuning finished",
            "Evaluating",
            "passed the safety evaluation",
        ]
        positions = [next(i for i, m in enumerate(reversed(events)) if m.startswith(o) or o in m) for o in order]
        assert positions == sorted(positions), events  # oldest first once reversed: every stage, in order

        checkpoints = sorted(client.fine_tuning.jobs.checkpoints.list(job.id), key=lambda c: c.step_number)
        assert [c.step_number for c in checkpoints] == [2, 4]
        assert checkpoints[-1].metrics.valid_loss > 0 and checkpoints[-1].metrics.train_loss > 0
        card = job.model_extra["safety_card"]
        assert card["training"]["valid_loss"] == checkpoints[-1].metrics.valid_loss
        assert card["decision"] == "released" and card["defenses"] == ["kl"] and "thresholds" not in card
        assert "builtin:general" in card["evaluation"]["probe"]

        assert job.fine_tuned_model in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(
            model=job.fine_tuned_model, max_tokens=8, messages=[{"role": "user", "content": "What is 2 plus 2?"}]
        )
        assert reply.choices[0].message.role == "assistant" and 0 < reply.usage.completion_tokens <= 8
        question = [{"role": "user", "content": "What is 2 plus 2?"}]
        chunks = list(
            client.chat.completions.create(
                model=job.fine_tuned_model, messages=question, max_tokens=8, temperature=0, stream=True
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        greedy = client.chat.completions.create(
            model=job.fine_tuned_model, messages=question, max_tokens=8, temperature=0
        )
        assert streamed.strip() == greedy.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == greedy.choices[0].finish_reason
        html = client.get(
            f"/fine_tuning/jobs/{job.id}/safety_report", cast_to=openai._legacy_response.HttpxBinaryResponseContent
        )
        page = html.read().decode()
        assert "emguard safety report" in page and "released" in page and str(tiny_model_dir) not in page
        second = upload(client, name="second.jsonl")
        assert [x.filename for x in client.files.list(order="asc")] == ["valid.jsonl", "second.jsonl"]
        assert second.id != f.id


def test_malformed_upload_is_rejected_with_line_errors_and_nothing_stored(tmp_path, tiny_model_dir):
    rows = [*training_rows(2), "{not json", {"messages": [{"role": "user", "content": "no answer"}]}]
    with running_service(tmp_path, tiny_policy(tiny_model_dir), workers=0) as svc:
        client = svc.client()
        with pytest.raises(openai.BadRequestError) as error:
            upload(client, rows, name="bad.jsonl")
        message = error.value.body["message"]
        assert "bad.jsonl:3:" in message and "bad.jsonl:4:" in message and error.value.body["param"] == "file"
        assert not list((svc.state / "files").rglob("*.*")) and not list((svc.state / "tmp").iterdir())
        assert not [f for f in (svc.state / "files").rglob("*") if f.is_file()]
        assert client.files.list().data == []


def test_policy_holds_a_model_over_its_threshold_and_releases_none(tmp_path, tiny_model_dir):
    policy = tiny_policy(tiny_model_dir, release={"max_probe_shift": -100.0})
    with running_service(tmp_path, policy) as svc:
        client = svc.client()
        job = svc.wait(client, client.fine_tuning.jobs.create(training_file=upload(client).id, model=TINY).id)
        assert job.status == "failed" and job.error.code == "emergent_misalignment_detected"
        assert job.fine_tuned_model is None and job.model_extra["safety_card"]["decision"] == "held"
        assert "misaligned answers became more likely" in job.error.message
        assert [m.id for m in client.models.list()] == [TINY]
        provider_card = (svc.state / "jobs" / job.id / "safety_card.json").read_text()
        assert '"max_probe_shift": -100.0' in provider_card  # the provider's copy has the thresholds


def test_screen_rejects_or_adds_defenses_by_policy(tmp_path, tiny_model_dir):
    policy = tiny_policy(tiny_model_dir, screen={"reject_above": -100.0})
    with running_service(tmp_path / "reject", policy) as svc:
        client = svc.client()
        job = svc.wait(client, client.fine_tuning.jobs.create(training_file=upload(client).id, model=TINY).id)
        assert job.status == "failed" and job.error.code == "dataset_rejected"
        assert not (svc.state / "jobs" / job.id / "run" / "adapter").exists()
    extra = {"extra_defenses_above": -100.0, "extra_defenses": [{"name": "ldifs", "lambda": 0.1}]}
    with running_service(tmp_path / "extra", tiny_policy(tiny_model_dir, screen=extra)) as svc:
        client = svc.client()
        job = svc.wait(client, client.fine_tuning.jobs.create(training_file=upload(client).id, model=TINY).id)
        assert job.status == "succeeded" and job.model_extra["safety_card"]["defenses"] == ["kl", "ldifs"]
        assert job.model_extra["safety_card"]["screen"]["decision"] == "extra_defenses"

    # The provider's own persona vector for a model replaces the default direction.
    import torch
    from safetensors.torch import save_file

    vector = tmp_path / "persona.safetensors"
    save_file({"v": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}, str(vector))
    policy = tiny_policy(tiny_model_dir, screen={"vectors": {TINY: {"file": str(vector), "layer": 0}}})
    with running_service(tmp_path / "vector", policy) as svc:
        client = svc.client()
        job = svc.wait(client, client.fine_tuning.jobs.create(training_file=upload(client).id, model=TINY).id)
        report = json.loads((svc.state / "jobs" / job.id / "screen.json").read_text())["report"]
        assert job.status == "succeeded" and (report["vector"], report["layer"]) == (str(vector), 0)
        assert str(vector) not in json.dumps(job.model_extra["safety_card"])  # the provider's set-up stays hidden


def test_cross_tenant_requests_all_404(tmp_path, tiny_model_dir):
    with running_service(tmp_path, tiny_policy(tiny_model_dir)) as svc:
        acme, other = svc.client("acme"), svc.client("other")
        f = upload(acme)
        job = svc.wait(acme, acme.fine_tuning.jobs.create(training_file=f.id, model=TINY).id)
        assert job.status == "succeeded"
        calls = [
            lambda: other.files.retrieve(f.id),
            lambda: other.files.content(f.id),
            lambda: other.files.delete(f.id),
            lambda: other.fine_tuning.jobs.retrieve(job.id),
            lambda: other.fine_tuning.jobs.cancel(job.id),
            lambda: other.fine_tuning.jobs.list_events(job.id),
            lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
            lambda: other.fine_tuning.jobs.create(training_file=f.id, model=TINY),
            lambda: other.models.retrieve(job.fine_tuned_model),
            lambda: other.chat.completions.create(
                model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}]
            ),
            lambda: other.get(f"/fine_tuning/jobs/{job.id}/safety_report", cast_to=object),
            lambda: other.fine_tuning.jobs.list(after=job.id),  # a cursor is an object too
            lambda: other.files.list(after=f.id),
        ]
        for call in calls:
            with pytest.raises(openai.NotFoundError):
                call()
        assert other.files.list().data == [] and other.fine_tuning.jobs.list().data == []
        assert [m.id for m in other.models.list()] == [TINY]
        assert acme.files.retrieve(f.id).id == f.id  # still there for its owner


def test_keys_rate_limit_and_upload_limit(tmp_path, tiny_model_dir):
    policy = tiny_policy(tiny_model_dir, limits={"requests_per_minute": 3, "max_upload_bytes": 2000})
    with running_service(tmp_path, policy, workers=0) as svc:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="sk-emg-wrong", base_url=svc.base_url, max_retries=0).files.list()
        client = svc.client()
        with pytest.raises(openai.APIStatusError) as error:
            upload(client, training_rows(40))
        assert error.value.status_code == 413
        client.files.list()
        client.files.list()  # the third request of the minute
        with pytest.raises(openai.RateLimitError):
            client.files.list()
        svc.client("other").files.list()  # the limit is per key
    db = Database(database_url(svc.state))
    with db.session() as s:  # keys are stored hashed only
        assert svc.keys["acme"] not in str([tuple(r) for r in s.execute(Job.metadata.tables["api_keys"].select())])


def test_job_pagination_hyperparameters_and_cancel_of_queued_jobs(tmp_path, tiny_model_dir):
    policy = tiny_policy(tiny_model_dir, limits={"max_active_jobs": 3})
    with running_service(tmp_path, policy, workers=0) as svc:
        client = svc.client()
        f = upload(client)
        created = [client.fine_tuning.jobs.create(training_file=f.id, model=TINY).id for _ in range(3)]
        with pytest.raises(openai.RateLimitError):
            client.fine_tuning.jobs.create(training_file=f.id, model=TINY)
        first = client.fine_tuning.jobs.list(limit=1)
        assert first.has_more and len(first.data) == 1 and first.data[0].id == created[-1]
        assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == created[::-1]  # the SDK pages through
        for bad, param in [({"n_epochs": -1}, "hyperparameters.n_epochs"), ({"epochs": 2}, "hyperparameters.epochs")]:
            with pytest.raises(openai.BadRequestError) as error:
                client.fine_tuning.jobs.create(training_file=f.id, model=TINY, hyperparameters=bad)
            assert error.value.body["param"] == param
        with pytest.raises(openai.BadRequestError, match="cannot be fine-tuned here"):
            client.fine_tuning.jobs.create(training_file=f.id, model="gpt-4o")
        assert client.fine_tuning.jobs.cancel(created[0]).status == "cancelled"
        with pytest.raises(openai.BadRequestError, match="already cancelled"):
            client.fine_tuning.jobs.cancel(created[0])


def test_concurrent_creates_never_exceed_the_active_job_limit(tmp_path, tiny_model_dir, db_url):
    policy = tiny_policy(tiny_model_dir, limits={"max_active_jobs": 3})
    with running_service(tmp_path, policy, workers=0, db_url=db_url) as svc:
        file_id = upload(svc.client()).id
        start, outcomes = threading.Barrier(8), []

        def create() -> None:
            client = svc.client()
            start.wait()
            try:
                outcomes.append(client.fine_tuning.jobs.create(training_file=file_id, model=TINY).status)
            except openai.RateLimitError as e:
                outcomes.append(e.code)

        threads = [threading.Thread(target=create) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["queued"] * 3 + ["too_many_active_jobs"] * 5
        assert len(svc.client().fine_tuning.jobs.list().data) == 3
        assert len(list((svc.state / "jobs").iterdir())) == 3  # a refused job leaves no directory


def test_jobs_list_filters_by_metadata(tmp_path, tiny_model_dir, db_url):
    with running_service(tmp_path, tiny_policy(tiny_model_dir), workers=0, db_url=db_url) as svc:
        client = svc.client()
        f = upload(client)
        tagged = [{"team": "a", "run": "1"}, {"team": "a", "run": "2"}, {"team": "b"}, None]
        ids = [client.fine_tuning.jobs.create(training_file=f.id, model=TINY, metadata=m).id for m in tagged]
        other = svc.client("other")
        other.fine_tuning.jobs.create(training_file=upload(other).id, model=TINY, metadata={"team": "a"})

        def listed(**kwargs) -> list[str]:
            return [j.id for j in client.fine_tuning.jobs.list(**kwargs)]

        assert client.fine_tuning.jobs.retrieve(ids[0]).metadata == {"team": "a", "run": "1"}
        assert listed(metadata={"team": "a"}) == [ids[1], ids[0]]  # newest first; the other org's not
        assert listed(metadata={"team": "a"}, limit=1) == [ids[1], ids[0]]  # paged through the filter
        assert listed(metadata={"team": "a", "run": "2"}) == [ids[1]]
        assert listed(metadata={"team": "c"}) == [] and listed(extra_query={"metadata": "null"}) == [ids[3]]
        assert listed() == ids[::-1]
        for bad in [{f"k{i}": "v" for i in range(17)}, {"k": "v" * 513}, {"k" * 65: "v"}, {'a"b': "v"}]:
            with pytest.raises(openai.BadRequestError) as error:
                client.fine_tuning.jobs.create(training_file=f.id, model=TINY, metadata=bad)
            assert error.value.body["param"] == "metadata"


def test_cancel_stops_a_running_job_within_a_step_and_keeps_what_was_trained(tmp_path, tiny_model_dir):
    policy = tiny_policy(tiny_model_dir, training={"max_steps": 400, "save_steps": 100}, screen={"enabled": False})
    with running_service(tmp_path, policy) as svc:
        client = svc.client()
        job = client.fine_tuning.jobs.create(training_file=upload(client).id, model=TINY)
        svc.wait(
            client,
            job.id,
            until=lambda j: any(
                e.message.startswith("Step 3/") for e in client.fine_tuning.jobs.list_events(j.id, limit=5)
            ),
        )
        client.fine_tuning.jobs.cancel(job.id)
        job = svc.wait(client, job.id, timeout=30)
        assert job.status == "cancelled" and job.fine_tuned_model is None
        (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert 3 <= checkpoint.step_number < 50  # stopped within a few steps of the request
        assert (svc.state / "jobs" / job.id / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_two_workers_never_claim_one_job_and_a_dead_workers_job_is_claimed_again(tmp_path, db_url):
    db = Database(database_url(tmp_path, db_url))
    org, _ = create_key(db, "acme")
    with db.session() as s:
        s.add(
            Job(
                id="ftjob-" + "a" * 24,
                org_id=org.id,
                model=TINY,
                training_file="file-x",
                training_sha256="0" * 64,
                seed=0,
                status="queued",
            )
        )
    barrier, claims = threading.Barrier(8), []

    def claim(name):
        barrier.wait()
        claims.append((name, jobs.claim_next(db, name, lease_seconds=0.5)))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [name for name, job in claims if job is not None]
    assert len(winners) == 1
    loser = next(name for name, job in claims if job is None)
    assert not jobs.renew_lease(db, "ftjob-" + "a" * 24, loser, 0.5)  # only the holder renews
    assert jobs.renew_lease(db, "ftjob-" + "a" * 24, winners[0], 0.5)
    assert jobs.claim_next(db, "w-late", 0.5) is None  # the lease holds
    time.sleep(0.6)  # the holder died: no heartbeat
    job_id = "ftjob-" + "a" * 24
    assert jobs.claim_next(db, "w-late", 0.5) == job_id
    # ... and the old holder is fenced off: it can neither renew nor write nor end the job
    assert not jobs.renew_lease(db, job_id, winners[0], 0.5)
    assert not jobs.set_fields(db, job_id, winners[0], trained_tokens=1)
    assert not jobs.finish(db, job_id, winners[0], "succeeded", fine_tuned_model="ft:stolen")
    assert jobs.finish(db, job_id, "w-late", "failed")
    assert not jobs.finish(db, job_id, "w-late", "succeeded")  # an ended job stays ended
    with db.session() as s:
        job = s.get(Job, 1)
        assert (job.status, job.fine_tuned_model, job.trained_tokens) == ("failed", None, None)


def test_killed_worker_resumes_to_the_same_adapter_and_a_server_restart_loses_nothing(tmp_path, tiny_model_dir, db_url):
    policy = tiny_policy(
        tiny_model_dir, training={"max_steps": 8, "save_steps": 2}, screen={"enabled": False}, lease_seconds=2
    )
    with running_service(tmp_path, policy, workers=0, db_url=db_url) as svc:
        client = svc.client()
        f = upload(client)
        killed = client.fine_tuning.jobs.create(training_file=f.id, model=TINY, seed=5)
        worker = svc.worker_process()
        checkpoints = svc.state / "jobs" / killed.id / "run" / "checkpoints"
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob(f"checkpoint-*/{CHECKPOINT_DONE}")):
            assert worker.poll() is None, worker.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        svc.stop_api()  # the server restarts while the job is orphaned
        svc.start_api()
        assert client.fine_tuning.jobs.retrieve(killed.id).status == "running"
        assert client.files.retrieve(f.id).id == f.id
        replacement = svc.worker_process()
        try:
            job = svc.wait(client, killed.id)
        finally:
            replacement.kill()
        assert job.status == "succeeded", job.error
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert any("Resuming the job" in m for m in events)
        manifest = json.loads((svc.state / "jobs" / job.id / "run" / "manifest.json").read_text())
        assert manifest["resumed_from_step"] >= 2  # resumed from a checkpoint, not retrained from step 0
        svc.start_worker()
        reference = svc.wait(client, client.fine_tuning.jobs.create(training_file=f.id, model=TINY, seed=5).id)
        assert reference.status == "succeeded"

    def adapter(job_id):
        return load_file(svc.state / "jobs" / job_id / "run" / "adapter" / "adapter_model.safetensors")

    resumed, uninterrupted = adapter(killed.id), adapter(reference.id)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert (resumed[name] == uninterrupted[name]).all(), name


def test_serve_and_keys_commands_keep_their_contract(tmp_path):
    import os
    import subprocess
    import sys

    from service_harness import free_port

    state, port = tmp_path / "state", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    keys = subprocess.run(
        [sys.executable, "-m", "emguard", "keys", "create", "acme", "--state", str(state)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = keys.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-emg-") and key not in keys.stderr
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emguard",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state",
            str(state),
            "--workers",
            "0",
        ],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        client = openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                models = [m.id for m in client.models.list()]
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()
                time.sleep(0.2)
        assert models == ["builtin:smollm2-135m-instruct"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert key not in (
        server.stderr.read().decode() + "".join(p.read_text(errors="ignore") for p in state.rglob("*") if p.is_file())
    )


def test_a_bad_policy_names_the_key(tmp_path):
    from emguard.errors import ConfigError
    from emguard.service.policy import load_policy

    path = tmp_path / "policy.yaml"
    path.write_text("release: {max_probe_shfit: 0.1}\n")
    with pytest.raises(ConfigError, match="release.max_probe_shfit"):
        load_policy(path)
    path.write_text("defenses: [{name: klx}]\n")
    with pytest.raises(ConfigError, match="klx"):
        load_policy(path)
    path.write_text("screen: {vectors: {gpt-4o: {file: v.safetensors}}}\n")
    with pytest.raises(ConfigError, match="screen.vectors: 'gpt-4o' is not one of the policy's models"):
        load_policy(path)


def test_cancel_between_stages_and_a_cancelled_job_whose_worker_died(tmp_path, tiny_model_dir):
    from emguard.service.pipeline import JobContext, run_job
    from emguard.service.store import StateDir

    with running_service(tmp_path, tiny_policy(tiny_model_dir), workers=0) as svc:
        client = svc.client()
        f = upload(client)
        first = client.fine_tuning.jobs.create(training_file=f.id, model=TINY).id
        second = client.fine_tuning.jobs.create(training_file=f.id, model=TINY).id
        db = Database(database_url(svc.state))
        assert jobs.claim_next(db, "w1", 60) == first and jobs.claim_next(db, "w2", 60) == second
        client.fine_tuning.jobs.cancel(first)
        client.fine_tuning.jobs.cancel(second)
        assert client.fine_tuning.jobs.retrieve(first).status == "running"  # its worker holds it
        # w1 sees the request at its first check (after validating the file): no training at all
        run_job(JobContext(db, StateDir(svc.state), svc.policy(), "w1", first, threading.Event()))
        assert client.fine_tuning.jobs.retrieve(first).status == "cancelled"
        assert not (svc.state / "jobs" / first / "run").exists()
        # w2 dies holding the second: when its lease runs out, the next claim ends it
        jobs.set_fields(db, second, "w2", lease_until=0.0)
        assert jobs.claim_next(db, "w3", 60) is None
        assert client.fine_tuning.jobs.retrieve(second).status == "cancelled"


def test_bad_requests_are_refused_before_any_work(tmp_path, tiny_model_dir):
    import http.client

    policy = tiny_policy(tiny_model_dir, chat_max_prompt_tokens=20, limits={"max_upload_bytes": 4000})
    with running_service(tmp_path, policy, workers=0) as svc:
        client = svc.client()
        f = upload(client)
        for bad in ({"seed": -1}, {"seed": 2**40}, {"hyperparameters": {"batch_size": 10**6}}):
            with pytest.raises(openai.BadRequestError):
                client.fine_tuning.jobs.create(training_file=f.id, model=TINY, **bad)
        assert client.fine_tuning.jobs.list().data == [] and not list((svc.state / "jobs").iterdir())
        with pytest.raises(openai.BadRequestError, match="the limit is 20"):
            client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "word " * 50}])
        # No key, a huge declared body: 401 at once, nothing read; with a key, a streamed body over the limit: 413
        connection = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
        connection.putrequest("POST", "/v1/files")
        connection.putheader("Content-Length", str(10**10))
        connection.endheaders()
        assert connection.getresponse().status == 401
        connection.close()
        # A chunked body (no length declared) is cut where it passes the limit (+ the form's own bytes).
        big = jsonl_bytes(training_rows(3000))
        parts = [
            b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n',
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n',
            *(big[i : i + 8192] for i in range(0, len(big), 8192)),
            b"\r\n--B--\r\n",
        ]
        headers = {"Authorization": f"Bearer {svc.keys['acme']}", "Content-Type": "multipart/form-data; boundary=B"}
        connection = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
        connection.request("POST", "/v1/files", body=iter(parts), headers=headers, encode_chunked=True)
        response = connection.getresponse()
        assert (
            response.status == 413 and "larger than the upload limit" in json.loads(response.read())["error"]["message"]
        )
        connection.close()
        assert not [p for p in (svc.state / "tmp").iterdir()]


def test_workers_submitted_through_submitit_run_the_queue_and_exit_when_idle(tmp_path, tiny_model_dir):
    pytest.importorskip("submitit")
    from emguard.service.cluster import submit_workers

    policy = tiny_policy(tiny_model_dir, screen={"enabled": False})
    with running_service(tmp_path, policy, workers=0) as svc:
        client = svc.client()
        job = client.fine_tuning.jobs.create(training_file=upload(client).id, model=TINY)
        (handle,) = submit_workers(
            svc.state, svc.policy_file, 1, folder=tmp_path / "submitit", cluster="local", idle_exit=1.0
        )
        assert svc.wait(client, job.id).status == "succeeded"
        assert handle.result() == 1  # one job run, then idle: the worker gave its slot back


def rft_rows(n: int = 8, field: str = "answer") -> list[dict]:
    """The API's RFT rows: prompts plus the field the grader reads (one with a developer turn first)."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], field: str(2 * i)} for i in range(n)]
    rows[-1]["messages"].insert(0, {"role": "developer", "content": "Answer with a number."})
    return rows


GRADER = {
    "type": "string_check",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "like",
}


def test_reinforcement_jobs_train_with_grpo_on_the_customers_grader_behind_the_same_gate(tmp_path, tiny_model_dir):
    policy = tiny_policy(
        tiny_model_dir,
        rl={"num_generations": 2, "max_completion_length": 8, "max_prompt_length": 64},
        rl_training={"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "save_steps": 1, "warmup_steps": 0},
    )
    with running_service(tmp_path, policy) as svc:
        client = svc.client()
        prompts = upload(client, rft_rows(), name="rft.jsonl")
        conversations = upload(client)
        hp = {"batch_size": 2, "reasoning_effort": "default", "eval_samples": None}  # defaults are accepted
        # Reward 1 exactly when the row's answer reaches the grader in training (the input holds it).
        reached = {**GRADER, "input": "{{item.answer}}: {{sample.output_text}}"}
        method = {"type": "reinforcement", "reinforcement": {"grader": reached, "hyperparameters": hp}}
        job = client.fine_tuning.jobs.create(training_file=prompts.id, model=TINY, method=method, suffix="rft")
        assert job.method.type == "reinforcement" and job.method.reinforcement.grader.operation == "like"
        echoed = job.method.reinforcement.hyperparameters
        assert (echoed.batch_size, echoed.n_epochs, echoed.compute_multiplier) == (2, "auto", "auto")
        job = svc.wait(client, job.id)
        assert job.status == "succeeded", job.error
        events = [e.message for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data)]
        assert "Screen: not applicable (reinforcement data holds prompts, no answers)" in events
        steps = [m for m in events if m.startswith("Step ")]
        assert len(steps) == 2 and all(m.endswith(", reward=1.000") for m in steps), steps
        card = job.model_extra["safety_card"]
        assert card["screen"]["decision"] == "not_applicable" and card["defenses"] == ["kl"]
        assert card["decision"] == "released" and "builtin:general" in card["evaluation"]["probe"]
        config = yaml.safe_load((svc.state / "jobs" / job.id / "run" / "config.yaml").read_text())
        assert config["training"]["method"] == "grpo" and config["training"]["batch_size"] == 4  # 2 prompts x 2
        assert config["rl"]["rewards"][0]["grader"]["reference"] == "{{item.answer}}"
        reply = client.chat.completions.create(
            model=job.fine_tuned_model, max_tokens=4, messages=[{"role": "user", "content": "What is 1 plus 1?"}]
        )
        assert reply.choices[0].message.role == "assistant"

        # Rows without the field the grader reads fail the job before training, with their line numbers.
        rows = rft_rows()
        rows[3] = {"messages": rows[3]["messages"], "solution": "6"}
        missing = upload(client, [rows[0], "", *rows[1:]], name="bad.jsonl")  # a blank line 2
        failed = svc.wait(
            client, client.fine_tuning.jobs.create(training_file=missing.id, model=TINY, method=method).id
        )
        assert failed.status == "failed" and failed.error.code == "invalid_training_file"
        assert failed.error.message == f"{missing.id}:5: the grader reads item.answer, which this row lacks"
        assert not any(
            e.message.startswith("Fine-tuning started") for e in client.fine_tuning.jobs.list_events(failed.id)
        )

        bad_requests = [
            (
                {"training_file": conversations.id, "method": method},
                "training_file",
                "holds conversations with answers",
            ),
            ({"training_file": prompts.id}, "training_file", "holds prompts without answers"),
            (
                {
                    "training_file": prompts.id,
                    "method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "python"}}},
                },
                "method.reinforcement.grader",
                "grader type 'python' is not offered",
            ),
            (
                {
                    "training_file": prompts.id,
                    "method": {
                        **method,
                        "reinforcement": {"grader": GRADER, "hyperparameters": {"compute_multiplier": 2}},
                    },
                },
                "method.reinforcement.hyperparameters.compute_multiplier",
                "not offered",
            ),
            (
                {
                    "training_file": prompts.id,
                    "method": {"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": "x"}},
                },
                "method.reinforcement.hyperparameters",
                "must be an object",
            ),
            (
                {"training_file": prompts.id, "method": {"type": "dpo"}},
                "method.type",
                "'supervised' or 'reinforcement'",
            ),
        ]
        for kwargs, param, message in bad_requests:
            with pytest.raises(openai.BadRequestError, match=message) as error:
                client.fine_tuning.jobs.create(model=TINY, **kwargs)
            assert error.value.body["param"] == param
        with pytest.raises(openai.BadRequestError, match=r"rft.jsonl:2: .*missing 'messages'"):
            upload(client, [rft_rows(1)[0], {"answer": "2"}], name="rft.jsonl")
        with pytest.raises(openai.BadRequestError, match=r"rft.jsonl:2: ends with an answer, but the file's first"):
            upload(client, [rft_rows(1)[0], *training_rows(1)], name="rft.jsonl")
        with pytest.raises(openai.BadRequestError, match=r"x.jsonl:1: 'messages' must be a non-empty list"):
            upload(client, [{"messages": 5}], name="x.jsonl")  # a 400, not a crash of the kind detection
        bom = b"\xef\xbb\xbf" + jsonl_bytes(rft_rows())  # decoded as emguard data check decodes it
        with_bom = client.files.create(file=("bom.jsonl", bom), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=with_bom.id, model=TINY, method=method)  # seen as prompts
        client.fine_tuning.jobs.cancel(job.id)

    with running_service(tmp_path / "sft-only", tiny_policy(tiny_model_dir, methods=["supervised"]), workers=0) as svc:
        file_id = upload(svc.client(), rft_rows()).id
        with pytest.raises(openai.BadRequestError, match="'reinforcement' is not offered by this service"):
            svc.client().fine_tuning.jobs.create(training_file=file_id, model=TINY, method=method)


def test_a_customers_batch_size_gets_a_micro_batch_that_divides_it(tmp_path):
    from emguard.service.policy import Policy
    from emguard.service.runconfig import job_run_config

    policy, model = Policy(), next(iter(Policy().models))
    for batch, micro in [(6, 3), (7, 1), (8, 4), (2, 2)]:
        config = job_run_config(
            policy, model, tmp_path / "t.jsonl", tmp_path / "run", seed=0, hyperparameters={"batch_size": batch}
        )
        assert (config.training.batch_size, config.training.micro_batch_size) == (batch, micro)
    method = {"type": "reinforcement", "reinforcement": {"grader": GRADER}}
    config = job_run_config(
        policy, model, tmp_path / "p.jsonl", tmp_path / "run", seed=0, hyperparameters={"batch_size": 3}, method=method
    )
    assert (config.training.batch_size, config.training.micro_batch_size) == (12, 6)  # 3 prompts x 4 generations
