"""``/v1/fine_tuning/jobs``: create, list, retrieve, cancel, events, checkpoints (+ the safety report)."""

from __future__ import annotations

import random
import re
import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import String, cast, or_, select

from emguard.service import jobs
from emguard.service.app import Org, Service, Svc
from emguard.service.card import card_html
from emguard.service.db import Checkpoint, Event, Job, Organization, new_id, paginate
from emguard.service.objects import APIError, checkpoint_object, event_object, job_object, not_found, page
from emguard.service.pipeline import TRAINING_FILE, VALIDATION_FILE
from emguard.service.policy import Policy
from emguard.service.rft import MethodError, check_reinforcement, is_prompt_file
from emguard.service.routes_files import own_file
from emguard.service.runconfig import HyperparameterError, check_hyperparameters

router = APIRouter()
_SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # integrations etc. are accepted and unused
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**31)
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        """The API's limits: at most 16 pairs, keys up to 64 characters, values up to 512."""
        if metadata is None:
            return None
        if len(metadata) > 16:
            raise ValueError(f"at most 16 key-value pairs, got {len(metadata)}")
        for key, value in metadata.items():
            if not 0 < len(key) <= 64 or len(value) > 512:
                raise ValueError(f"keys take 1-64 characters and values up to 512 (key {key[:64]!r})")
            if '"' in key or "\\" in key:  # they cannot be matched in a JSON path: jobs.list could not find them
                raise ValueError(f"metadata keys may not contain quotes or backslashes (key {key!r})")
        return metadata or None


def _hyperparameters(request: JobRequest, policy: Policy) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hyperparameters, method) from the deprecated top-level field, ``method.supervised`` or
    ``method.reinforcement``."""
    method = request.method or {"type": "supervised"}
    kind, max_epochs = method.get("type", "supervised"), policy.max_epochs
    if kind in ("supervised", "reinforcement") and kind not in policy.methods:
        raise APIError(400, f"method.type {kind!r} is not offered by this service", param="method.type")
    if kind == "reinforcement":
        if request.hyperparameters:
            raise APIError(400, "reinforcement jobs take method.reinforcement.hyperparameters", param="hyperparameters")
        try:
            return check_reinforcement(method, max_epochs)
        except MethodError as e:
            raise APIError(400, str(e), param=e.param) from None
    if kind != "supervised":
        raise APIError(
            400, f"method.type {kind!r} is not offered here; use 'supervised' or 'reinforcement'", param="method.type"
        )
    nested = (method.get("supervised") or {}).get("hyperparameters")
    if nested and request.hyperparameters:
        raise APIError(
            400, "give hyperparameters in method.supervised or at the top level, not both", param="hyperparameters"
        )
    try:
        hp = check_hyperparameters(nested or request.hyperparameters, max_epochs)
    except HyperparameterError as e:
        raise APIError(400, str(e), param=f"hyperparameters.{e.param}") from None
    return hp, {"type": "supervised", "supervised": {"hyperparameters": hp}}


def _check_file_kind(svc: Service, f: Any, method: str, param: str = "training_file") -> None:
    """Prompts (ending with a user turn) for reinforcement, conversations with answers for supervised."""
    prompts = is_prompt_file(svc.state.blob(f.id))
    if prompts and method == "supervised":
        raise APIError(
            400,
            f"{f.id} holds prompts without answers (an RFT file): use method.type 'reinforcement' with a grader, "
            "or upload conversations that end with the assistant's answer",
            param=param,
        )
    if not prompts and method == "reinforcement":
        raise APIError(
            400,
            f"{f.id} holds conversations with answers: reinforcement jobs take prompts (messages ending with a user "
            "turn, plus the fields the grader reads)",
            param=param,
        )


def own_job(svc: Service, org: Organization, job_id: str) -> Job:
    with svc.db.session() as s:
        job = s.scalar(select(Job).where(Job.id == job_id, Job.org_id == org.id))
    if job is None:
        raise not_found("fine_tuning_job", job_id, "fine_tuning_job_id")
    return job


@router.post("/fine_tuning/jobs")
def create_job(
    org: Org,
    svc: Svc,
    request: Annotated[JobRequest, Body()],
) -> dict:
    if request.model not in svc.policy.models:
        offered = ", ".join(svc.policy.models)
        raise APIError(
            400,
            f"model {request.model!r} cannot be fine-tuned here; available: {offered}",
            param="model",
            code="model_not_available",
        )
    if request.suffix is not None and not _SUFFIX.match(request.suffix):
        raise APIError(400, "suffix: 1-64 letters, digits, '-' or '_'", param="suffix")
    hp, method = _hyperparameters(request, svc.policy)
    training = own_file(svc, org, request.training_file, "training_file")
    _check_file_kind(svc, training, method["type"])
    validation = None
    if request.validation_file is not None:
        if method["type"] == "reinforcement":
            raise APIError(400, "reinforcement jobs take no validation_file here", param="validation_file")
        validation = own_file(svc, org, request.validation_file, "validation_file")
        _check_file_kind(svc, validation, method["type"], "validation_file")
    limit = svc.policy.limits.max_active_jobs
    too_many = APIError(429, f"at most {limit} jobs may be queued or running at once", code="too_many_active_jobs")
    if jobs.active_jobs(svc.db, org.id) >= limit:  # cheap early answer; checked again under the lock below
        raise too_many
    job = Job(
        id=new_id("ftjob-"),
        org_id=org.id,
        model=request.model,
        training_file=training.id,
        training_sha256=training.sha256,
        validation_file=request.validation_file,
        suffix=request.suffix,
        seed=request.seed if request.seed is not None else random.randrange(2**31),
        hyperparameters=hp,
        method=method,
        metadata_=request.metadata,
        status="queued",
    )
    # The job trains on its own copy: deleting the upload later does not touch it. The copy comes
    # first (a job row without its data would fail in the worker) and goes if the row is not written.
    job_dir = svc.state.job_dir(job.id)
    job_dir.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(svc.state.blob(training.id), job_dir / TRAINING_FILE)
        if validation is not None:
            shutil.copyfile(svc.state.blob(validation.id), job_dir / VALIDATION_FILE)
        with svc.db.session() as s:
            jobs.lock_organization(s, org.id)  # concurrent creates of one organisation count one at a time
            if jobs.count_active(s, org.id) >= limit:
                raise too_many
            s.add(job)
            s.flush()  # the event's foreign key needs the job's row first
            s.add(Event(job_id=job.id, message=f"Created fine-tuning job: {job.id}"))
    except BaseException as e:
        shutil.rmtree(job_dir, ignore_errors=True)
        if isinstance(e, FileNotFoundError):  # the upload was deleted meanwhile
            raise not_found("file", request.training_file, "training_file") from None
        raise
    return job_object(job, org.id)


def _metadata_filter(request: Request) -> list[Any]:
    """``metadata[KEY]=VALUE`` query parameters (the SDK's ``jobs.list(metadata={...})``): jobs whose
    metadata holds every pair; ``metadata=null``: jobs without metadata."""
    conditions: list[Any] = []
    for name, value in request.query_params.multi_items():
        if name == "metadata":
            if value != "null":
                raise APIError(400, "metadata takes metadata[KEY]=VALUE pairs or null", param="metadata")
            conditions.append(or_(Job.metadata_.is_(None), cast(Job.metadata_, String) == "null"))
        elif name.startswith("metadata[") and name.endswith("]"):
            conditions.append(Job.metadata_[name[len("metadata[") : -1]].as_string() == value)
    return conditions


@router.get("/fine_tuning/jobs")
def list_jobs(
    request: Request,
    org: Org,
    svc: Svc,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    query = select(Job).where(Job.org_id == org.id, *_metadata_filter(request))
    with svc.db.session() as s:
        try:
            rows, more = paginate(s, query, Job, after, limit)
        except LookupError:
            raise not_found("fine_tuning_job", after, "after") from None
    return page([job_object(j, org.id) for j in rows], more)


@router.get("/fine_tuning/jobs/{job_id}")
def retrieve_job(job_id: str, org: Org, svc: Svc) -> dict:
    return job_object(own_job(svc, org, job_id), org.id)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, org: Org, svc: Svc) -> dict:
    job = own_job(svc, org, job_id)
    if job.status in ("succeeded", "failed", "cancelled"):
        raise APIError(400, f"the job is already {job.status}", param="fine_tuning_job_id")
    jobs.request_cancel(svc.db, job)
    jobs.add_event(svc.db, job.id, "Cancellation requested")
    return job_object(own_job(svc, org, job_id), org.id)


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_events(
    org: Org,
    svc: Svc,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict:
    job = own_job(svc, org, job_id)
    with svc.db.session() as s:
        try:
            rows, more = paginate(s, select(Event).where(Event.job_id == job.id), Event, after, limit)
        except LookupError:
            raise not_found("event", after, "after") from None
    return page([event_object(e) for e in rows], more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(
    org: Org,
    svc: Svc,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict:
    job = own_job(svc, org, job_id)
    with svc.db.session() as s:
        try:
            rows, more = paginate(s, select(Checkpoint).where(Checkpoint.job_id == job.id), Checkpoint, after, limit)
        except LookupError:
            raise not_found("checkpoint", after, "after") from None
    return page([checkpoint_object(c, job) for c in rows], more)


@router.get("/fine_tuning/jobs/{job_id}/safety_report", response_class=HTMLResponse)
def safety_report(job_id: str, org: Org, svc: Svc) -> str:
    """emguard's addition: the job's safety card as a page (the JSON is ``safety_card`` in the job)."""
    job = own_job(svc, org, job_id)
    if job.card is None:
        raise APIError(404, "this job has no safety card yet", code="report_not_found")
    return card_html(job.card)
