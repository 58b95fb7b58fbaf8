"""``/v1/models`` and ``/v1/chat/completions``: the base models and the caller's released models."""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from emguard.service.app import Org, Service, Svc
from emguard.service.db import Job, Organization
from emguard.service.objects import APIError
from emguard.service.serving import ChatUnavailable, Finished, PromptTooLong, complete, stream

router = APIRouter()


def _released(svc: Service, org: Organization) -> list[Job]:
    with svc.db.session() as s:
        return list(
            s.scalars(
                select(Job).where(Job.org_id == org.id, Job.status == "succeeded", Job.fine_tuned_model.is_not(None))
            )
        )


def _resolve(svc: Service, org: Organization, model: str) -> tuple[str, Path | None]:
    """(emguard model spec, adapter directory) of a model the caller may use; 404 otherwise."""
    if model in svc.policy.models:
        return svc.policy.models[model], None
    with svc.db.session() as s:
        job = s.scalar(
            select(Job).where(Job.fine_tuned_model == model, Job.org_id == org.id, Job.status == "succeeded")
        )
    if job is None or job.model not in svc.policy.models:
        raise APIError(
            404,
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return svc.policy.models[job.model], svc.state.run_dir(job.id) / "adapter"


def _model_object(ident: str, created: int, owner: str) -> dict[str, Any]:
    return {"id": ident, "object": "model", "created": created, "owned_by": owner}


@router.get("/models")
def list_models(org: Org, svc: Svc) -> dict:
    data = [_model_object(m, 0, "system") for m in svc.policy.models]
    data += [_model_object(j.fine_tuned_model, j.finished_at or j.created_at, org.name) for j in _released(svc, org)]
    return {"object": "list", "data": data}


@router.get("/models/{model:path}")
def retrieve_model(model: str, org: Org, svc: Svc) -> dict:
    _resolve(svc, org, model)
    return _model_object(model, 0, "system" if model in svc.policy.models else org.name)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    seed: int | None = Field(None, ge=0, lt=2**31)
    stream: bool = False


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Annotated[ChatRequest, Body()],
    org: Org,
    svc: Svc,
) -> dict | StreamingResponse:
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    bad = [i for i, m in enumerate(messages) if m["role"] not in ("system", "user", "assistant")]
    if bad:
        raise APIError(400, f"messages[{bad[0]}].role must be system, user or assistant", param=f"messages.{bad[0]}")
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must come from the user", param="messages")
    spec, adapter = _resolve(svc, org, request.model)
    limit = svc.policy.chat_max_tokens
    max_tokens = min(request.max_completion_tokens or request.max_tokens or limit, limit)
    if request.stream:
        if request.n != 1:
            raise APIError(400, "stream=true takes n=1", param="n")
        return await _stream(svc, request, messages, spec, adapter, max_tokens)

    def generate() -> tuple[list[tuple[str, str]], int, int]:
        loaded = svc.models.get(spec, adapter)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        return complete(
            loaded,
            messages,
            n=request.n,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=seed,
            max_prompt_tokens=svc.policy.chat_max_prompt_tokens,
        )

    try:
        choices, prompt_tokens, completion_tokens = await run_in_threadpool(generate)
    except PromptTooLong as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    except ChatUnavailable as e:
        raise _unavailable(e) from None
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _unavailable(e: ChatUnavailable) -> APIError:
    return APIError(503, f"The model cannot be served right now: {e}", code="model_unavailable")


async def _stream(
    svc: Service, request: ChatRequest, messages: list[dict], spec: str, adapter: Path | None, max_tokens: int
) -> StreamingResponse:
    """Server-sent events in the API's ``chat.completion.chunk`` shape, ending with ``data: [DONE]``."""
    try:
        loaded = await run_in_threadpool(svc.models.get, spec, adapter)
    except ChatUnavailable as e:
        raise _unavailable(e) from None
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    pieces = stream(
        loaded,
        messages,
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=seed,
        max_prompt_tokens=svc.policy.chat_max_prompt_tokens,
    )
    try:  # the prompt is checked before the first byte goes out: a long one is still a plain 400
        first = await run_in_threadpool(next, pieces, None)
    except PromptTooLong as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": request.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        return f"data: {json.dumps(body)}\n\n"

    def events() -> Iterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        for piece in itertools.chain([first], pieces):
            if isinstance(piece, Finished):
                yield chunk({}, piece.reason)
            elif piece:
                yield chunk({"content": piece})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
