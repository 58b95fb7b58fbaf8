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
from typing import Annotated

from fastapi import Depends, FastAPI, Request
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


@dataclass
class Service:
    state: StateDir
    policy: Policy
    db: Database
    limiter: RateLimiter
    models: object  # serving.ModelCache, created on the first chat request


def service(request: Request) -> Service:
    return request.app.state.service


def organization(request: Request, svc: Annotated[Service, Depends(service)]) -> Organization:
    """The caller's organisation, from ``Authorization: Bearer KEY``; 401 otherwise, 429 over the rate."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401, "Missing API key: send 'Authorization: Bearer KEY' (emguard keys create ORG).", code="invalid_api_key"
        )
    org = organization_for(svc.db, key.strip())
    if org is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    if not svc.limiter.allow(key.strip()):
        raise APIError(429, "Rate limit reached for requests; retry after a few seconds.", code="rate_limit_exceeded")
    return org


# Route parameters: the caller's organisation (authenticated, rate-limited) and the service.
Org = Annotated[Organization, Depends(organization)]
Svc = Annotated[Service, Depends(service)]


def create_app(state: Path, policy: Policy | None = None, db_url: str | None = None) -> FastAPI:
    from emguard.service.routes_chat import router as chat_router
    from emguard.service.routes_files import router as files_router
    from emguard.service.routes_jobs import router as jobs_router
    from emguard.service.serving import ModelCache

    policy = policy or Policy()
    store = StateDir(state)
    db = Database(database_url(store.root, db_url))
    app = FastAPI(title="emguard fine-tuning service", docs_url=None, redoc_url=None)
    app.state.service = Service(
        store, policy, db, RateLimiter(policy.limits.requests_per_minute), ModelCache(policy.serve_cache_models)
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
    return app
