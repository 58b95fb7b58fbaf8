"""``/v1/files``: upload (checked at once: a bad upload is rejected with FILE:LINE errors and nothing
is stored), list, retrieve, delete, content."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import Response
from sqlalchemy import select

from emguard.service.app import Org, Service, Svc
from emguard.service.db import Organization, StoredFile, paginate
from emguard.service.objects import APIError, file_object, not_found, page
from emguard.service.store import UploadTooLarge, check_training_file

router = APIRouter()
PURPOSES = ("fine-tune",)


def own_file(svc: Service, org: Organization, file_id: str, param: str | None = None) -> StoredFile:
    with svc.db.session() as s:
        f = s.scalar(
            select(StoredFile).where(
                StoredFile.id == file_id, StoredFile.org_id == org.id, StoredFile.deleted.is_(False)
            )
        )
    if f is None:
        raise not_found("file", file_id, param)
    return f


@router.post("/files")
def upload(
    org: Org,
    svc: Svc,
    request: Request,
    file: UploadFile,
    purpose: Annotated[str, Form()],
) -> dict:
    if purpose not in PURPOSES:
        raise APIError(400, f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}", param="purpose")
    limit = svc.policy.limits.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:  # the form's own bytes
        raise APIError(413, f"the upload is larger than this service's limit of {limit} bytes", param="file")
    name = (file.filename or "upload.jsonl").replace("\n", " ")[:256]
    try:
        with svc.state.receive(file.file, limit) as (tmp, sha256, size):
            examples, problems = check_training_file(tmp, name, svc.policy.limits.max_examples)
            if problems:
                raise APIError(
                    400, "Invalid training file:\n" + "\n".join(problems), param="file", code="invalid_training_file"
                )
            svc.state.keep(tmp, sha256)
    except UploadTooLarge as e:
        raise APIError(413, str(e), param="file") from None
    with svc.db.session() as s:
        row = StoredFile(org_id=org.id, filename=name, purpose=purpose, bytes=size, sha256=sha256, examples=examples)
        s.add(row)
    return file_object(row)


@router.get("/files")
def list_files(
    org: Org,
    svc: Svc,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    purpose: str | None = None,
) -> dict:
    query = select(StoredFile).where(StoredFile.org_id == org.id, StoredFile.deleted.is_(False))
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    with svc.db.session() as s:
        try:
            rows, more = paginate(s, query, StoredFile, after, limit)
        except LookupError:
            raise not_found("file", after, "after") from None
    return page([file_object(f) for f in rows], more)


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, org: Org, svc: Svc) -> dict:
    return file_object(own_file(svc, org, file_id))


@router.get("/files/{file_id}/content")
def file_content(file_id: str, org: Org, svc: Svc) -> Response:
    f = own_file(svc, org, file_id)
    return Response(svc.state.blob(f.sha256).read_bytes(), media_type="application/octet-stream")


@router.delete("/files/{file_id}")
def delete_file(file_id: str, org: Org, svc: Svc) -> dict:
    f = own_file(svc, org, file_id)
    with svc.db.session() as s:
        s.get(StoredFile, f.seq).deleted = True
        # The bytes go unless another live upload has the same content (jobs train on their own
        # copy, made when the job is created).
        still_used = s.scalar(
            select(StoredFile.id).where(StoredFile.sha256 == f.sha256, StoredFile.deleted.is_(False)).limit(1)
        )
    if not still_used:
        svc.state.remove_blob(f.sha256)
    return {"id": f.id, "object": "file", "deleted": True}
