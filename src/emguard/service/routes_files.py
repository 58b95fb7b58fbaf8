"""``/v1/files``: upload (checked at once: a bad upload is rejected with FILE:LINE errors and nothing
is stored), list, retrieve, delete, content."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import Response
from sqlalchemy import select

from emguard.service.app import Org, Service, Svc
from emguard.service.db import Organization, StoredFile, new_id, paginate
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
    file: UploadFile,
    purpose: Annotated[str, Form()],
) -> dict:
    if purpose not in PURPOSES:
        raise APIError(400, f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}", param="purpose")
    limit = svc.policy.limits.max_upload_bytes
    name = (file.filename or "upload.jsonl").replace("\n", " ")[:256]
    row = StoredFile(id=new_id("file-"), org_id=org.id, filename=name, purpose=purpose)
    try:
        with svc.state.receive(file.file, limit) as (tmp, sha256, size):
            examples, problems = check_training_file(tmp, name, svc.policy.limits.max_examples)
            if problems:
                raise APIError(
                    400, "Invalid training file:\n" + "\n".join(problems), param="file", code="invalid_training_file"
                )
            row.sha256, row.bytes, row.examples = sha256, size, examples
            svc.state.keep(tmp, row.id)
    except UploadTooLarge as e:
        raise APIError(413, str(e), param="file") from None
    try:
        with svc.db.session() as s:
            s.add(row)
    except BaseException:
        svc.state.remove_blob(row.id)
        raise
    return file_object(row)


@router.get("/files")
def list_files(
    org: Org,
    svc: Svc,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    purpose: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    query = select(StoredFile).where(StoredFile.org_id == org.id, StoredFile.deleted.is_(False))
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    with svc.db.session() as s:
        try:
            rows, more = paginate(s, query, StoredFile, after, limit, ascending=order == "asc")
        except LookupError:
            raise not_found("file", after, "after") from None
    return page([file_object(f) for f in rows], more)


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, org: Org, svc: Svc) -> dict:
    return file_object(own_file(svc, org, file_id))


@router.get("/files/{file_id}/content")
def file_content(file_id: str, org: Org, svc: Svc) -> Response:
    f = own_file(svc, org, file_id)
    try:
        content = svc.state.blob(f.id).read_bytes()
    except FileNotFoundError:  # deleted by a concurrent request
        raise not_found("file", file_id) from None
    return Response(content, media_type="application/octet-stream")


@router.delete("/files/{file_id}")
def delete_file(file_id: str, org: Org, svc: Svc) -> dict:
    f = own_file(svc, org, file_id)
    with svc.db.session() as s:
        s.get(StoredFile, f.seq).deleted = True
    svc.state.remove_blob(f.id)  # jobs train on their own copy, made when the job is created
    return {"id": f.id, "object": "file", "deleted": True}
