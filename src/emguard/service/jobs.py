"""Job state changes, shared by the API and the workers: events, claiming with a lease, cancel, finish.

Claiming is one conditional UPDATE (``... WHERE id = :id AND <still claimable>``): of two workers
that race for a job exactly one sees a changed row. On PostgreSQL the candidate is also read with
``FOR UPDATE SKIP LOCKED``, so racing workers pick different jobs instead of colliding.
A worker renews its lease with a heartbeat; a job whose lease ran out (its worker died) is claimable
again and resumes from its run directory's last checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from emguard.service.db import TERMINAL_STATES, Checkpoint, Database, Event, Job, Organization, now


def add_event(
    db: Database, job_id: str, message: str, *, level: str = "info", data: dict | None = None, kind: str = "message"
) -> None:
    with db.session() as s:
        s.add(Event(job_id=job_id, message=message, level=level, data=data, type=kind))


def claimable(at: float):
    """Queued jobs, and running jobs whose worker stopped renewing its lease."""
    return or_(
        Job.status == "queued",
        (Job.status.in_(("validating_files", "running"))) & (Job.lease_until < at),
    )


def claim_next(db: Database, worker: str, lease_seconds: float) -> str | None:
    """Claim the oldest claimable job for ``worker``; its id, or None when there is none.

    A job that was cancelled while its worker held it, and whose worker then died, ends here.
    """
    at = time.time()
    with db.session() as s:
        s.execute(
            update(Job)
            .where(claimable(at), Job.cancel_requested.is_(True))
            .values(status="cancelled", finished_at=now(), lease_until=0.0)
        )
        query = select(Job.id).where(claimable(at), Job.cancel_requested.is_(False)).order_by(Job.seq).limit(1)
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        job_id = s.scalar(query)
        if job_id is None:
            return None
        claimed = s.execute(
            update(Job)
            .where(Job.id == job_id, claimable(at), Job.cancel_requested.is_(False))
            .values(status="running", worker=worker, lease_until=at + lease_seconds, attempts=Job.attempts + 1)
        ).rowcount
    return job_id if claimed == 1 else None


def renew_lease(db: Database, job_id: str, worker: str, lease_seconds: float) -> bool:
    """Extend ``worker``'s lease; False when the job is no longer its own (lease lost or job ended)."""
    with db.session() as s:
        return (
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                .values(lease_until=time.time() + lease_seconds)
            ).rowcount
            == 1
        )


def cancel_requested(db: Database, job_id: str) -> bool:
    with db.session() as s:
        return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def held_by(worker: str, at: float | None = None):
    """The job is running on ``worker`` and its lease has not run out."""
    return (Job.worker == worker) & (Job.status == "running") & (Job.lease_until > (at or time.time()))


def set_fields(db: Database, job_id: str, worker: str | None = None, **values: Any) -> bool:
    """Update a job; with ``worker``, only while that worker holds a live lease on it (a worker that
    lost its lease, or whose job was cancelled and ended, must not overwrite it)."""
    with db.session() as s:
        query = update(Job).where(Job.id == job_id)
        if worker is not None:
            query = query.where(held_by(worker))
        return s.execute(query.values(**values)).rowcount == 1


def holds(db: Database, job_id: str, worker: str) -> bool:
    with db.session() as s:
        return s.scalar(select(Job.id).where(Job.id == job_id, held_by(worker))) is not None


def finish(db: Database, job_id: str, worker: str | None, status: str, **values: Any) -> bool:
    """End a job (with ``worker``: only while it holds a live lease). False when it did not."""
    assert status in TERMINAL_STATES
    return set_fields(db, job_id, worker, status=status, finished_at=now(), lease_until=0.0, **values)


def release(db: Database, job_id: str, worker: str) -> None:
    """Give a job back (the worker is shutting down): claimable at once, and not counted as a crash."""
    set_fields(db, job_id, worker, lease_until=0.0, attempts=Job.attempts - 1)


def request_cancel(db: Database, job: Job) -> None:
    """Queued (or orphaned) jobs are cancelled at once; a running one at its worker's next check
    (every training step, and between stages)."""
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
        s.execute(
            update(Job)
            .where(
                Job.id == job.id,
                or_(Job.status == "queued", Job.lease_until < time.time()),
                Job.status.not_in(TERMINAL_STATES),
            )
            .values(status="cancelled", finished_at=now(), lease_until=0.0)
        )


def record_checkpoint(db: Database, job_id: str, step: int, metrics: dict[str, Any]) -> None:
    """One row per step (a resumed job that saves a step again updates the row)."""
    with db.session() as s:
        row = s.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step))
        if row is None:
            s.add(Checkpoint(job_id=job_id, step=step, metrics=metrics))
        else:
            row.metrics = metrics


def active_jobs(db: Database, org_id: str) -> int:
    with db.session() as s:
        return count_active(s, org_id)


def count_active(session: Session, org_id: str) -> int:
    """The organisation's queued or running jobs."""
    query = select(func.count()).select_from(Job).where(Job.org_id == org_id, Job.status.not_in(TERMINAL_STATES))
    return session.scalar(query)


def lock_organization(session: Session, org_id: str) -> None:
    """Hold the organisation's row until the transaction ends: a no-op UPDATE takes PostgreSQL's row
    lock and SQLite's write lock before anything is read, so a check-then-insert under it is atomic."""
    session.execute(update(Organization).where(Organization.id == org_id).values(id=Organization.id))
