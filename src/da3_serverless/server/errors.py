"""Every error the server answers, in one place per kind: our `ServiceError`s, Starlette's
HTTP errors (unknown path, wrong method), FastAPI's validation errors and, last, anything
unexpected, which becomes `internal` (500) with the cause logged.

A request in RunPod's form (`{"input": ...}`) fails in RunPod's form: `{"id", "status":
"FAILED" (or "CANCELLED"), "error": "<JSON text of code/status/message>"}`; a bare request gets
the v1 error body `{"error": {"code", "message"}, "status"}`. Either way the HTTP status is the
error's.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from da3_serverless.api.errors import ServiceError
from da3_serverless.server.queue import CANCELLED, FAILED

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5


def error_response(request: Request, err: ServiceError) -> JSONResponse:
    """The answer to a failed request, in the form the request came in."""
    state = request.state
    fields = getattr(state, "log", None)
    if fields is not None:
        fields["code"] = err.code
    headers = {}
    if err.status in (429, 503):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if getattr(state, "envelope", False):
        job_id = getattr(state, "job_id", None) or uuid.uuid4().hex
        status = CANCELLED if err.code == "cancelled" else FAILED
        body = {"id": job_id, "status": status, "error": err.to_json()}
    else:
        body = err.to_dict()
    return JSONResponse(body, status_code=err.status, headers=headers)


def internal_error(request: Request) -> ServiceError:
    request_id = getattr(request.state, "request_id", "?")
    return ServiceError(
        "internal", f"unexpected server error; the server log has request {request_id}"
    )


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(request, exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = "not_found" if exc.status_code == 404 else "invalid_input"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(request, ServiceError(code, message, exc.status_code))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, ServiceError("invalid_input", f"bad request: {exc}"))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "?")
    log.error(
        "unexpected error",
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"fields": {"request_id": request_id, "path": request.url.path}},
    )
    return error_response(request, internal_error(request))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
