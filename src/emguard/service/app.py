"""``emguard serve``'s HTTP API (FastAPI): the OpenAI fine-tuning subset, per-organisation keys, limits.

Handlers are plain functions over the database; the pipeline runs in the workers, never here.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from emguard.service.db import Database, Organization, database_url
from emguard.service.keys import organization_for
from emguard.service.objects import APIError
from emguard.service.policy import Policy
from emguard.service.store import StateDir

log = logging.getLogger(__name__)


class RateLimiter:
    """At most ``per_minute`` requests per key in any 60 s window (per server process)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._seen: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        at = time.monotonic()
        with self._lock:
            seen = self._seen[key]
            while seen and seen[0] <= at - 60:
                seen.popleft()
            if len(seen) >= self.per_minute:
                return False
            seen.append(at)
            return True


JSON_BODY_LIMIT = 1 << 20  # every request but an upload: 1 MiB


class Gatekeeper:
    """ASGI middleware in front of every ``/v1`` route: the key is checked *before* any body is read
    (FastAPI parses a request's form before it runs dependencies), and the body is cut at the limit
    (the upload limit for ``POST /v1/files``, 1 MiB otherwise), declared or streamed."""

    def __init__(self, app: Any, db: Database, upload_limit: int):
        self.app, self.db, self.upload_limit = app, db, upload_limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        scheme, _, key = headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return await _reply(send, APIError(401, MISSING_KEY, code="invalid_api_key"))
        org = await run_in_threadpool(organization_for, self.db, key)
        if org is None:
            return await _reply(send, APIError(401, "Incorrect API key provided.", code="invalid_api_key"))
        scope.setdefault("state", {}).update(organization=org, api_key=key)  # read by ``organization``
        upload = scope["method"] == "POST" and scope["path"] == "/v1/files"
        limit = self.upload_limit + 64 * 1024 if upload else JSON_BODY_LIMIT  # + the form's own bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await _reply(send, _too_large(limit, upload))
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # raised inside the route's body parsing: FastAPI passes HTTPException on
                raise StarletteHTTPException(413, _too_large(limit, upload).message)
            return message

        await self.app(scope, counted, send)


MISSING_KEY = "Missing API key: send 'Authorization: Bearer KEY' (emguard keys create ORG)."


def _too_large(limit: int, upload: bool) -> APIError:
    what = f"the upload limit of {limit - 64 * 1024} bytes" if upload else f"the request limit of {limit} bytes"
    return APIError(413, f"The request body is larger than {what}.", param="file" if upload else None)


async def _reply(send: Any, error: APIError) -> None:
    await JSONResponse(error.body(), status_code=error.status)({"type": "http"}, None, send)


@dataclass
class Service:
    state: StateDir
    policy: Policy
    db: Database
    limiter: RateLimiter
    models: object  # serving.ModelCache: models load on the first chat request


def service(request: Request) -> Service:
    return request.app.state.service


def organization(request: Request, svc: Annotated[Service, Depends(service)]) -> Organization:
    """The caller's organisation (authenticated by ``Gatekeeper`` before the body was read); 429 over the rate."""
    if not svc.limiter.allow(request.state.api_key):
        raise APIError(429, "Rate limit reached for requests; retry after a few seconds.", code="rate_limit_exceeded")
    return request.state.organization


# Route parameters: the caller's organisation (authenticated, rate-limited) and the service.
Org = Annotated[Organization, Depends(organization)]
Svc = Annotated[Service, Depends(service)]


def create_app(state: Path, policy: Policy | None = None, db_url: str | None = None) -> FastAPI:
    from emguard.config import LoraConfig
    from emguard.service.routes_chat import router as chat_router
    from emguard.service.routes_files import router as files_router
    from emguard.service.routes_jobs import router as jobs_router
    from emguard.service.serving import ModelCache
    from emguard.service.serving_vllm import chat_backend, lora_rank_for, vllm_loader

    policy = policy or Policy()
    loader = None
    if chat_backend(policy.chat_backend) == "vllm":
        loader = vllm_loader(
            max_loras=policy.serve_cache_models,
            max_lora_rank=lora_rank_for(LoraConfig.model_validate(policy.lora).r),  # one vLLM refuses stops the start
            max_model_len=policy.chat_max_prompt_tokens + policy.chat_max_tokens,
            gpu_memory_utilization=policy.chat_gpu_memory_utilization,
        )
    store = StateDir(state)
    db = Database(database_url(store.root, db_url))
    app = FastAPI(title="emguard fine-tuning service", docs_url=None, redoc_url=None)
    app.state.service = Service(
        store, policy, db, RateLimiter(policy.limits.requests_per_minute), ModelCache(policy.serve_cache_models, loader)
    )

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        message = f"Invalid request: {'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(APIError(400, message, param=".".join(where) or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(APIError(500, "internal server error").body(), status_code=500)

    for router in (files_router, jobs_router, chat_router):
        app.include_router(router, prefix="/v1")
    app.add_middleware(Gatekeeper, db=db, upload_limit=policy.limits.max_upload_bytes)
    return app
