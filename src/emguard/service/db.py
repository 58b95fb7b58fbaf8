"""The service's state: organisations, API keys, files, jobs, events and checkpoints (SQLAlchemy).

SQLite in the state directory by default (WAL mode, so the server and its workers read while one
writes); any SQLAlchemy URL (``postgresql+psycopg://...``) for several machines. Every table has an
integer ``seq`` (insertion order, used for pagination) and a public string ``id`` of the OpenAI
shape (``file-…``, ``ftjob-…``, ``ftevent-…``, ``ftckpt-…``).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

DATABASE_FILE = "emguard.db"
# Job states of the OpenAI API; a job is "active" (a worker may hold it) in the first three.
ACTIVE_STATES = ("validating_files", "queued", "running")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Organization(Base):
    __tablename__ = "organizations"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("org-"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class ApiKey(Base):
    """A key is stored as its SHA-256 only: keys are 256 random bits, so a fast hash is enough (a
    slow password hash protects low-entropy secrets) and lookup stays one indexed query."""

    __tablename__ = "api_keys"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("key-"))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(32))  # the key's first characters, for listings
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class StoredFile(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("file-"))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    filename: Mapped[str] = mapped_column(String(512))  # display only: never part of a path
    purpose: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    examples: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class Job(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("ftjob-"))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(String(64))
    training_sha256: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    method: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(32), default="validating_files", index=True)
    stage: Mapped[str] = mapped_column(String(32), default="queued")  # emguard's finer stage
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), nullable=True, unique=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    card: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The lease: the worker that holds the job and until when (renewed by its heartbeat).
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class Event(Base):
    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("ftevent-"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    type: Mapped[str] = mapped_column(String(16), default="message")


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("ftckpt-"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Database:
    """An engine and a session factory over one URL; creates the tables on first use."""

    def __init__(self, url: str):
        self.url = url
        self.engine: Engine = create_engine(url, **_engine_options(url))
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def database_url(state: Path, url: str | None = None) -> str:
    """``url`` when given (several machines share one PostgreSQL), else SQLite in ``state``."""
    return url or f"sqlite:///{(state / DATABASE_FILE).resolve()}"


def _engine_options(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # One connection per thread; the API's handlers run in a thread pool.
        return {"connect_args": {"check_same_thread": False, "timeout": 30}}
    return {"pool_pre_ping": True}


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA busy_timeout=30000")  # writers wait for each other instead of failing
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def paginate(
    session: Session, query: Any, table: type[Base], after: str | None, limit: int, ascending: bool = False
) -> tuple[list, bool]:
    """Newest first (or oldest); ``after`` = the id of the last object of the previous page, looked up
    within ``query`` (another organisation's id is unknown here). (rows, has_more)."""
    if after is not None:
        seq = session.scalar(query.with_only_columns(table.seq).where(table.id == after))
        if seq is None:
            raise LookupError(after)
        query = query.where(table.seq > seq if ascending else table.seq < seq)
    order = table.seq.asc() if ascending else table.seq.desc()
    rows = list(session.scalars(query.order_by(order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
