"""A worker: claims jobs from the shared database and runs them, one at a time, in its own process.

Any number of workers (on any number of machines sharing the database and the state directory) may
run at once; the lease in ``jobs.claim_next`` keeps a job on one worker. A heartbeat thread renews
the lease; a worker that dies stops renewing it, and after ``policy.lease_seconds`` the job is
claimed again and resumes from its run directory.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from pathlib import Path

from sqlalchemy import select

from emguard.service import jobs
from emguard.service.db import Database, Job, database_url
from emguard.service.pipeline import JobContext, JobLost, run_job
from emguard.service.policy import Policy
from emguard.service.store import StateDir

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # a job that has taken down this many workers fails instead of taking down more


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    def __init__(self, state: Path, policy: Policy, db_url: str | None = None, name: str | None = None):
        self.state = StateDir(state)
        self.policy = policy
        self.db = Database(database_url(self.state.root, db_url))
        self.name = name or worker_name()

    def run_forever(
        self, poll_seconds: float = 1.0, stop: threading.Event | None = None, idle_exit: float | None = None
    ) -> int:
        """Run jobs until ``stop`` is set (or, with ``idle_exit``, until no job came for that many
        seconds: a worker started by a cluster scheduler gives its GPU back). Returns the jobs run."""
        stop = stop or threading.Event()
        log.info("worker %s: waiting for jobs", self.name)
        ran_jobs, idle_since = 0, time.monotonic()
        while not stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # e.g. the database is briefly unreachable: keep the worker alive
                log.exception("worker %s: could not claim or run a job", self.name)
                ran = False
            if ran:
                ran_jobs, idle_since = ran_jobs + 1, time.monotonic()
            elif idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                break
            else:
                stop.wait(poll_seconds)
        return ran_jobs

    def run_once(self) -> bool:
        """Claim one job and run it to its end (or until the lease is lost); False when none was waiting."""
        job_id = jobs.claim_next(self.db, self.name, self.policy.lease_seconds)
        if job_id is None:
            return False
        with self.db.session() as s:
            attempts = s.scalar(select(Job.attempts).where(Job.id == job_id))
        if attempts > MAX_ATTEMPTS:
            jobs.add_event(self.db, job_id, f"Job failed: its worker stopped {attempts - 1} times", level="error")
            jobs.finish(
                self.db,
                job_id,
                self.name,
                "failed",
                error={"code": "worker_lost", "message": "the job stopped its worker repeatedly", "param": None},
            )
            return True
        lost = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job_id, lost), daemon=True)
        beat.start()
        try:
            if attempts > 1:
                jobs.add_event(self.db, job_id, "Resuming the job on another worker from its last checkpoint")
            run_job(JobContext(self.db, self.state, self.policy, self.name, job_id, lost))
        except JobLost:
            log.warning("worker %s lost the lease of %s; another worker has it", self.name, job_id)
        except (KeyboardInterrupt, SystemExit):  # shutting down: give the job back for another worker
            jobs.release(self.db, job_id, self.name)
            jobs.add_event(self.db, job_id, "Worker stopped; the job resumes from its last checkpoint")
            raise
        except Exception:
            log.exception("job %s failed inside worker %s", job_id, self.name)
            jobs.add_event(self.db, job_id, "Job failed: internal error", level="error")
            jobs.finish(
                self.db,
                job_id,
                self.name,
                "failed",
                error={
                    "code": "internal_error",
                    "message": "internal error; the provider has the details",
                    "param": None,
                },
            )
        finally:
            lost.set()  # also stops the heartbeat
            beat.join()
        return True

    def _heartbeat(self, job_id: str, lost: threading.Event) -> None:
        """Renew the lease every quarter lease; give the job up (``lost``) when the renewal is refused,
        or when none has succeeded for three quarters of a lease: before any other worker may claim it."""
        lease = self.policy.lease_seconds
        renewed = time.monotonic()
        while not lost.wait(lease / 4):
            try:
                if not jobs.renew_lease(self.db, job_id, self.name, lease):
                    lost.set()
                renewed = time.monotonic()
            except Exception:  # the database is briefly unreachable: try again at the next beat
                log.exception("heartbeat of %s failed", job_id)
                if time.monotonic() - renewed > 0.75 * lease:
                    lost.set()


def run_worker(
    state: Path, policy: Policy, db_url: str | None = None, poll_seconds: float = 1.0, idle_exit: float | None = None
) -> int:
    """``emguard worker``: run jobs until interrupted (SIGINT or SIGTERM give the running job back) or
    idle for ``idle_exit`` seconds; returns the jobs run."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit)
    worker = Worker(state, policy, db_url)
    try:
        return worker.run_forever(poll_seconds, idle_exit=idle_exit)
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        worker.db.dispose()


def _exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
