"""Every error the server answers, in one place per kind: our `ServiceError`s, Starlette's
HTTP errors (unknown path, wrong method), FastAPI's validation errors and, last, anything
unexpected, which becomes `internal` (500) with the cause logged.

A request in RunPod's form (`{"input": ...}`) fails in RunPod's form: `{"id", "status":
"FAILED" (or "CANCELLED"), "error": "<JSON text of code/status/message>"}`; a bare request gets
the v1 error body `{"error": {"code", "message"}, "status"}`. Either way the HTTP status is the
error's. RunPod's `/v2` paths always answer in RunPod's form, even before their body is read
(a malformed query parameter). A malformed path, query or header parameter gets a short
message naming it and what it must be, never the caller's input; a 405 names the allowed
methods in `Allow`.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from da3_serverless.api.errors import ServiceError
from da3_serverless.server.queue import CANCELLED, FAILED

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5


# Where FastAPI found a parameter -> how a message names it.
_PLACES = {"query": "query parameter", "path": "path parameter", "header": "header"}
_MAX_NAME = 40  # characters of a parameter's name (or field path) quoted in a message
_MAX_PROBLEMS = 3  # malformed parameters named in one message


def error_response(
    request: Request, err: ServiceError, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The answer to a failed request, in the form the request came in (RunPod's on `/v2`)."""
    state = request.state
    fields = getattr(state, "log", None)
    if fields is not None:
        fields["code"] = err.code
    headers = dict(headers or {})
    if err.status in (429, 503):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if getattr(state, "envelope", False) or request.url.path.startswith("/v2/"):
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
    path = request.url.path
    path = path if len(path) <= 100 else path[:100] + "..."
    message = f"{request.method} {path}: {exc.detail}"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
        message += f"; use {headers['Allow']}"
    return error_response(request, ServiceError(code, message, exc.status_code), headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at the request's path (Starlette names only the first
    route's): the 405 answer's `Allow` (RFC 9110)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**request.scope, "method": "OPTIONS"})
            if match != Match.NONE:
                methods |= route.methods
    return ", ".join(sorted(methods))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [_problem(error) for error in exc.errors()[:_MAX_PROBLEMS]]
    message = "; ".join(problems) or "malformed request"
    return error_response(request, ServiceError("invalid_input", message))


def _problem(error: dict) -> str:
    """One FastAPI validation error as "query parameter 'wait' must be a valid integer":
    the parameter's name (capped) and pydantic's rule, without the input it was given."""
    place, *names = [str(part) for part in error.get("loc", ())] or ["request"]
    name = ".".join(names)
    if len(name) > _MAX_NAME:
        name = name[:_MAX_NAME] + "..."
    where = f"{_PLACES.get(place, place)} '{name}'" if name else _PLACES.get(place, place)
    kind = str(error.get("type", ""))
    if kind.startswith("int_"):
        return f"{where} must be an integer"
    if kind.startswith("float_"):
        return f"{where} must be a number"
    rule = str(error.get("msg", "is malformed")).split(",")[0]
    rule = rule.replace("Input should be", "must be", 1).replace("Field required", "is required")
    return f"{where} {rule[:100]}"


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
