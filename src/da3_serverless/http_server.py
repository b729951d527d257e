"""Self-hosted HTTP transport: the v1 contract over FastAPI, plus a browser playground.

Endpoints: `POST /runsync` (answer when done), `POST /run` + `GET /status/{id}` (background
job), `GET /health`, `GET /ready`, `GET /models`, `GET /metrics`, `GET /` (playground),
`/openapi.json` and `/docs`.

Bodies: the bare v1 request object gets the bare v1 response (or `{"error": {...}, "status"}`).
RunPod's `{"input": {...}}` form gets RunPod's envelope: `{"id", "status": "COMPLETED",
"output"}` or `{"id", "status": "FAILED", "error": "<JSON text of code/status/message>"}`, so
clients written for RunPod work unchanged. Either way the HTTP status is the error's status.
All the work (auth, images, model, outputs) happens in `Service`; this file only moves bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from da3_serverless import __version__
from da3_serverless.api.auth import check_api_key, key_from_headers
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.schema import RunRequest, RunResponse
from da3_serverless.config import Settings
from da3_serverless.http_queue import COMPLETED, FAILED, IN_PROGRESS, Job, JobStore, Scheduler
from da3_serverless.service import Service

log = logging.getLogger("da3_serverless.http")
STATIC_DIR = Path(__file__).parent / "static"
RETRY_AFTER_S = 5


# --- OpenAPI documentation models (responses are built by hand, these only describe them) ---


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
    status: int


class RunPodEnvelope(BaseModel):
    """RunPod's job form; `error` is the JSON text of `{"code", "status", "message"}`."""

    id: str
    status: str
    output: RunResponse | None = None
    error: str | None = None
    delayTime: int | None = None
    executionTime: int | None = None


class RunPodRequest(BaseModel):
    input: RunRequest


class Ready(BaseModel):
    ready: bool
    model_id: str
    error: str | None = None


_ERRORS = {s: {"model": ErrorBody} for s in (400, 401, 404, 413, 500, 502, 503)}
# Requests in RunPod's form fail in RunPod's form.
_RUN_ERRORS = {s: {"model": ErrorBody | RunPodEnvelope} for s in _ERRORS}


# --- app ---


def create_app(settings: Settings, service: Service | None = None) -> FastAPI:
    """The server as an ASGI app. Without `service`, one is built from `settings`.

    The model loads in a background thread at startup (unless `service.ready` already), so
    `/health` answers at once and `/ready` says 503 until the model is warm.
    """
    service = service if service is not None else Service(settings)
    scheduler = Scheduler(settings.max_queue, settings.model_concurrency, RETRY_AFTER_S)
    jobs = JobStore(settings.max_jobs, settings.job_ttl_s)
    metrics = _Metrics(scheduler, service)
    state: dict[str, Any] = {"draining": False, "start_error": None}

    def load_model() -> None:
        try:
            service.start()
        except Exception as exc:  # keep serving /health and /ready with the reason
            state["start_error"] = f"{type(exc).__name__}: {exc}"
            log.exception("model load failed", extra={"fields": {"model": settings.model_id}})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["draining"] = False  # an app may be started again after a shutdown (tests do)
        if not service.ready:
            threading.Thread(target=load_model, name="da3-model-load", daemon=True).start()
        yield
        state["draining"] = True
        pending = jobs.unfinished_tasks()
        if pending:
            await asyncio.wait(pending, timeout=settings.shutdown_grace_s)

    app = FastAPI(
        title="da3-serverless",
        version=__version__,
        summary="Depth Anything 3: metric depth, camera and extras from a photo (API v1)",
        lifespan=lifespan,
        docs_url=None,  # served below from vendored files: no CDN at run time
        redoc_url=None,
    )
    app.state.drain = lambda: state.__setitem__("draining", True)

    @app.middleware("http")
    async def log_and_count(request: Request, call_next: Any) -> Response:
        request_id = _request_id(request)
        request.state.request_id = request_id
        request.state.log = {}
        start = time.perf_counter()
        response = await call_next(request)
        elapsed = time.perf_counter() - start
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.observe(path, str(response.status_code), request.state.log.get("code"), elapsed)
        response.headers["X-Request-ID"] = request_id
        if path not in ("/metrics", "/health", "/static"):
            fields = {"request_id": request_id, "method": request.method, "path": path,
                      "status": response.status_code, "duration_ms": round(elapsed * 1000, 1),
                      **request.state.log}  # fmt: skip
            log.info("request", extra={"fields": fields})
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "invalid_input"
        err = ServiceError(
            code, f"{request.method} {request.url.path}: {exc.detail}", exc.status_code
        )
        return _error_response(request, err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(request, ServiceError("invalid_input", f"bad request: {exc}"))

    async def submit(request: Request) -> tuple[object, bool, str | None, str]:
        """Read, unwrap, check the key and admit a request.

        Returns (v1 payload, RunPod form?, key from the headers, model queue key)."""
        if state["draining"]:
            raise ServiceError("model_unavailable", "the server is shutting down; retry elsewhere")
        body = await _read_json(request, settings.max_body_bytes)
        envelope = isinstance(body, dict) and "input" in body
        if envelope:
            request.state.envelope = True
            if set(body) != {"input"}:
                extra = sorted(name[:40] for name in set(body) - {"input"})[:5]
                raise ServiceError(
                    "invalid_input", f"only 'input' is supported in the RunPod form, not {extra}"
                )
            body = body["input"]
        header_key = key_from_headers(request.headers)
        # Refuse bad keys and malformed requests before they take a place in the queue (and
        # so /run refuses them at once); Service.handle checks them again the same way.
        model_key = service.model_key(service.authorize(body, header_key))
        request.state.log["model"] = model_key
        scheduler.admit()
        return body, envelope, header_key, model_key

    @app.post(
        "/runsync",
        summary="Run one request and answer with the result",
        description='Body: the v1 request object, or RunPod\'s `{"input": {...}}` form.',
        responses={200: {"model": RunResponse | RunPodEnvelope}, **_RUN_ERRORS},
        openapi_extra=_request_body_doc(),
    )
    async def runsync(request: Request) -> JSONResponse:
        job_id = uuid.uuid4().hex
        try:
            payload, envelope, header_key, model_key = await submit(request)
            result = await scheduler.run(
                model_key, lambda: service.handle(payload, api_key=header_key)
            )
        except ServiceError as err:
            return _error_response(request, err, job_id)
        except Exception:
            log.exception(
                "unexpected error",
                extra={"fields": {"request_id": getattr(request.state, "request_id", "?")}},
            )
            return _error_response(request, _internal(request), job_id)
        request.state.log.update(_result_log(result))
        if envelope:
            return JSONResponse({"id": job_id, "status": COMPLETED, "output": result})
        return JSONResponse(result)

    @app.post(
        "/run",
        summary="Queue one request as a background job",
        description='Answers `{"id", "status": "IN_QUEUE"}`; poll `GET /status/{id}`.',
        responses={200: {"model": RunPodEnvelope}, **_RUN_ERRORS},
        openapi_extra=_request_body_doc(),
    )
    async def run(request: Request) -> JSONResponse:
        try:
            payload, _, header_key, model_key = await submit(request)
        except ServiceError as err:
            return _error_response(request, err)
        except Exception:
            log.exception(
                "unexpected error",
                extra={
                    "fields": {
                        "path": "/run",
                        "request_id": getattr(request.state, "request_id", "?"),
                    }
                },
            )
            return _error_response(request, _internal(request))
        job = jobs.new()
        job.task = asyncio.create_task(run_job(job, payload, header_key, model_key))
        return JSONResponse({"id": job.id, "status": job.status})

    async def run_job(job: Job, payload: object, header_key: str | None, model_key: str) -> None:
        def work() -> dict[str, Any]:
            job.status, job.started = IN_PROGRESS, time.monotonic()
            return service.handle(payload, api_key=header_key)

        try:
            job.output = await scheduler.run(model_key, work)
            job.status = COMPLETED
        except ServiceError as err:
            job.error, job.status = _error_fields(err), FAILED
        except Exception:
            log.exception("unexpected error in job", extra={"fields": {"job_id": job.id}})
            job.error = _error_fields(ServiceError("internal", f"job {job.id} failed; see logs"))
            job.status = FAILED
        finally:
            job.finished = time.monotonic()
            code = (job.error or {}).get("code")
            metrics.observe("/run (job)", job.status, code, job.finished - job.created)

    @app.get(
        "/status/{job_id}",
        summary="A `/run` job's status (RunPod's IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED)",
        responses={200: {"model": RunPodEnvelope}, **_ERRORS},
    )
    async def status(request: Request, job_id: str) -> JSONResponse:
        try:  # outputs hold file paths and results: key holders only, as on RunPod
            check_api_key(key_from_headers(request.headers), settings)
        except ServiceError as err:
            return _error_response(request, err)
        job = jobs.get(job_id)
        if job is None:
            err = ServiceError("not_found", f"no job {job_id!r} (unknown, or older than the TTL)")
            return _error_response(request, err)
        body: dict[str, Any] = {"id": job.id, "status": job.status}
        if job.started is not None:
            body["delayTime"] = round((job.started - job.created) * 1000)
        if job.finished is not None and job.started is not None:
            body["executionTime"] = round((job.finished - job.started) * 1000)
        if job.output is not None:
            body["output"] = job.output
        if job.error is not None:
            body["error"] = json.dumps(job.error)
        return JSONResponse(body)

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        summary="Readiness: 200 once the default model is loaded, else 503",
        responses={200: {"model": Ready}, 503: {"model": Ready}},
    )
    async def ready() -> JSONResponse:
        ok = service.ready and not state["draining"]
        body = Ready(ready=ok, model_id=settings.model_id, error=state["start_error"])
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/models", summary="The model table: capabilities and licenses")
    async def models() -> list[dict[str, Any]]:
        return service.model_table()

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{app.title} API",
            swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url="data:,",
        )  # fmt: skip

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


# --- helpers ---


class _Metrics:
    """Prometheus metrics in the app's own registry (several apps may live in one process)."""

    def __init__(self, scheduler: Scheduler, service: Service):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "da3_http_requests", "HTTP requests", ["path", "status"], registry=r
        )
        self.errors = Counter("da3_errors", "Errors by code", ["code"], registry=r)
        self.latency = Histogram(
            "da3_request_duration_seconds", "Request latency", ["path"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )  # fmt: skip
        Gauge("da3_queue_depth", "Requests waiting", registry=r).set_function(
            lambda: scheduler.waiting
        )
        Gauge("da3_inflight", "Inferences running", registry=r).set_function(
            lambda: scheduler.running
        )
        Gauge("da3_model_ready", "Default model loaded", registry=r).set_function(
            lambda: float(service.ready)
        )

    def observe(self, path: str, status: str, code: str | None, seconds: float) -> None:
        self.requests.labels(path, status).inc()
        self.latency.labels(path).observe(seconds)
        if code is not None:
            self.errors.labels(code).inc()


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 64 and all(c.isalnum() or c in "-_." for c in given):
        return given
    return uuid.uuid4().hex


async def _read_json(request: Request, limit: int) -> object:
    """The body parsed as JSON, refused past `limit` bytes before it is all read."""
    too_large = ServiceError(
        "image_too_large", f"request body over {limit} bytes (MAX_BODY_BYTES); send a smaller "
        "image or pass it by image_url",
    )  # fmt: skip
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        # Large bodies are parsed off the event loop, which keeps serving /health meanwhile.
        if len(body) > 1_000_000:
            return await anyio.to_thread.run_sync(json.loads, body)
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError("invalid_input", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ServiceError("invalid_input", "the body's JSON is nested too deeply") from None


def _error_fields(err: ServiceError) -> dict[str, Any]:
    return {"code": err.code, "status": err.status, "message": err.message}


def _internal(request: Request) -> ServiceError:
    rid = getattr(request.state, "request_id", "?")
    return ServiceError("internal", f"unexpected server error; the server log has request {rid}")


def _error_response(request: Request, err: ServiceError, job_id: str | None = None) -> JSONResponse:
    request.state.log = {**getattr(request.state, "log", {}), "code": err.code}
    headers = {}
    if err.status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if getattr(request.state, "envelope", False):
        body: dict[str, Any] = {
            "id": job_id or uuid.uuid4().hex,
            "status": FAILED,
            "error": json.dumps(_error_fields(err)),
        }
    else:
        body = err.to_dict()
    return JSONResponse(body, status_code=err.status, headers=headers)


def _result_log(result: dict[str, Any]) -> dict[str, Any]:
    """What one line of log may say about a result: sizes and timings, no data."""
    views = result.get("views") or [result]
    return {
        "model": result.get("model_id"),
        "images": [[v.get("width"), v.get("height")] for v in views],
        "timings_ms": result.get("timings_ms"),
    }


def _request_body_doc() -> dict[str, Any]:
    schema = {
        "anyOf": [
            {"$ref": "#/components/schemas/RunRequest"},
            {"$ref": "#/components/schemas/RunPodRequest"},
        ]
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request models that the hand-read bodies use."""
    if app.openapi_schema is None:
        doc = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in (RunRequest, RunPodRequest):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
        app.openapi_schema = doc
    return app.openapi_schema


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


# --- CLI ---


class _Server(uvicorn.Server):
    """uvicorn that stops taking new work (503) as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._app.state.drain()
        super().handle_exit(sig, frame)


def cli_serve(args: argparse.Namespace, settings: Settings) -> int:
    """`da3-serverless serve`: run the server until SIGINT/SIGTERM, then drain and exit."""
    if args.model:
        settings = settings.model_copy(update={"model_id": args.model})
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )  # fmt: skip
    _Server(config, app).run()
    return 0
