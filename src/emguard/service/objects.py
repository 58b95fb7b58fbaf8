"""Rows -> the JSON objects of the OpenAI API (the shapes the official SDK parses), and API errors."""

from __future__ import annotations

from typing import Any

from emguard.service.db import Checkpoint, Event, Job, StoredFile


class APIError(Exception):
    """An error response: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    TYPES = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_exceeded",
        500: "server_error",
    }

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def not_found(kind: str, ident: str, param: str | None = None) -> APIError:
    """404 for a missing object *and* for another organisation's object: the two look the same."""
    return APIError(404, f"No such {kind}: {ident}", param=param, code=f"{kind}_not_found")


def file_object(f: StoredFile) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def job_object(j: Job, org_id: str) -> dict[str, Any]:
    hp = j.hyperparameters or {}
    return {
        "id": j.id,
        "object": "fine_tuning.job",
        "created_at": j.created_at,
        "finished_at": j.finished_at,
        "model": j.model,
        "fine_tuned_model": j.fine_tuned_model,
        "organization_id": org_id,
        "status": j.status,
        "training_file": j.training_file,
        "validation_file": j.validation_file,
        "hyperparameters": {k: hp.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        "method": j.method or {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "result_files": [],
        "trained_tokens": j.trained_tokens,
        "error": j.error,
        "seed": j.seed,
        "user_provided_suffix": j.suffix,
        "estimated_finish": None,
        "integrations": [],
        "metadata": j.metadata_,
        # emguard's additions (the SDK keeps unknown fields): the safety card once evaluated.
        "safety_card": j.card,
    }


def event_object(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "object": "fine_tuning.job.event",
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "data": e.data or {},
        "type": e.type,
    }


def checkpoint_object(c: Checkpoint, job: Job) -> dict[str, Any]:
    return {
        "id": c.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": c.created_at,
        # Checkpoints are listed, never served: only the evaluated final model passes the gate.
        "fine_tuned_model_checkpoint": f"{job.fine_tuned_model or job.id}:ckpt-step-{c.step}",
        "fine_tuning_job_id": job.id,
        "metrics": {"step": c.step, **(c.metrics or {})},
        "step_number": c.step,
    }


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
