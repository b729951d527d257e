"""The service, free of any transport: request -> auth -> images -> predictor -> outputs ->
storage -> response. Transports (RunPod worker, HTTP server, CLI) call `Service.handle`, or
`Service.handle_batch` for several requests that share forwards (`Service.batch_key` says which
may)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from da3_serverless.api.anchors import decode_anchor_maps, fit_anchors
from da3_serverless.api.auth import check_api_key
from da3_serverless.api.budget import (
    Budget,
    RequestCost,
    default_budget,
    estimate_cost,
    request_budget,
)
from da3_serverless.api.cameras import checked_cameras
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.images import DecodedImage, decode_request_images, open_request_images
from da3_serverless.api.job import JobInfo, Progress
from da3_serverless.api.outputs import (
    Artifact,
    encode_outputs,
    encode_scene,
    unavailable_outputs,
    view_skeleton,
    wants_gaussians,
    wants_points,
    wants_scene,
)
from da3_serverless.api.placement import place_outputs
from da3_serverless.api.schema import SCHEMA_VERSION, RunRequest, parse_request
from da3_serverless.api.storage import OutputStore, Saved
from da3_serverless.config import Settings
from da3_serverless.inference.cache import (
    ModelCache,
    canonical_model_id,
    default_budget_bytes,
)
from da3_serverless.inference.cancel import CancelGroup, Cancelled, CancelToken
from da3_serverless.inference.catalog import MODELS, ModelInfo, lookup_model, valid_model_ids
from da3_serverless.inference.prediction import Prediction
from da3_serverless.inference.predictor import Predictor, PredictRequest, default_dtype
from da3_serverless.inference.progress import block_progress
from da3_serverless.inference.weights import ModelNotFoundError, WeightLocator
from da3_serverless.model.checkpoint import CheckpointError, holds_gaussians, read_preset
from da3_serverless.sequence.pipeline import SequenceContext, run_sequence

log = logging.getLogger(__name__)


@dataclass
class _Timer:
    timings_ms: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        """Count `seconds` towards stage `name` (stages shared by a batch count for each)."""
        self.timings_ms[name] = round(self.timings_ms.get(name, 0.0) + seconds * 1000, 3)


class Service:
    """Holds the settings, the model cache and the output store; `handle` serves one request.

    Thread-safe: several transports' threads may call `handle` at once (the HTTP server
    serialises inference per model itself).
    """

    def __init__(self, settings: Settings, model_cache: ModelCache | None = None):
        self.settings = settings
        self.store = OutputStore(settings)
        self.locator = WeightLocator.from_settings(settings)
        self.model_cache = model_cache or ModelCache(
            self._load, self._budget_bytes(), self._model_dtype()
        )
        self.budget = self._request_budget()
        self._ready = False

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Load and warm the default model (raises on failure), prune old outputs."""
        if not self.settings.api_key and not self.settings.allow_unauthenticated:
            log.warning("DA3_API_KEY is not set: every request will be refused (401)")
        elif not self.settings.api_key:
            log.warning("DA3_ALLOW_UNAUTHENTICATED=1: serving without an API key")
        log.info("request budget: %s", self.budget.describe())
        log.info("model memory budget: %.1f GiB", self.model_cache.budget_bytes / 1024**3)
        self.store.maybe_prune()
        started = time.perf_counter()
        with self.model_cache.use(self.default_model_id) as predictor:
            if self.settings.warmup:
                warm_up(predictor)
        self._ready = True
        seconds = time.perf_counter() - started
        log.info(
            "ready: model %s on %s (%s), loaded%s in %.1f s", predictor.model_id,
            predictor.device, str(predictor.dtype).removeprefix("torch."),
            " and warmed" if self.settings.warmup else "", seconds,
        )  # fmt: skip

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def waiting_for_memory(self) -> int:
        """Requests waiting for a model to fit in memory (they hold a place in a queue)."""
        return self.model_cache.waiting

    def model_table(self) -> list[dict]:
        loaded = set(self.model_cache.loaded())
        return [
            {
                "model_id": info.repo_id,
                "short_name": info.short_name,
                "preset": info.preset,
                "license": info.license,
                # a pair of models: each repository with its own license
                "parts": [
                    {"model_id": part, "license": lookup_model(part).license} for part in info.parts
                ],
                "metric": info.metric,
                "needs_focal_length": info.needs_focal,
                "camera": info.camera,
                "confidence": info.confidence,
                "sky": info.sky,
                "gaussians": info.gaussians,
                "params_millions": info.params_m,
                "gpu_memory_gb": info.gpu_memory_gb,
                "default": info.repo_id == self.default_model_id,
                "loaded": info.repo_id in loaded,
                "availability": self._availability(info.repo_id, loaded),
            }
            for info in MODELS
        ]

    def _availability(self, repo_id: str, loaded: set[str]) -> str:
        """`available` (loaded, or its weights on disk), `downloadable` (not on disk; the first
        request downloads it) or `unavailable` (not on disk, downloads off)."""
        if repo_id in loaded:
            return "available"
        try:
            self.locator.resolve_all(repo_id, download=False)  # a pair: both on disk
        except ModelNotFoundError:
            return "unavailable" if self.locator.offline else "downloadable"
        return "available"

    # ---- one request ---------------------------------------------------------------------

    def handle(
        self,
        payload: object,
        api_key: str | None = None,
        cancel: CancelToken | None = None,
        job: JobInfo | None = None,
    ) -> dict:
        """Serve one v1 request (the RunPod `input` object); `api_key` comes from transport
        headers and is used when the payload has none. Returns the response dict; raises
        ServiceError. A failed request leaves no file behind.

        `cancel` is the job's token: once cancelled, the request stops at its next check
        (between views while decoding, between the network's blocks, before encoding, before
        saving) and raises `cancelled`, having freed what it held and written nothing. Past
        the last check (`CancelToken.commit`, before the first file) it completes. `job`: its
        id (bucket keys), its own bucket, where its progress goes."""
        try:
            return self._serve(payload, api_key, cancel or CancelToken(), job)
        except Cancelled as stop:
            reason = str(stop)  # out of the except block: its traceback holds the tensors
        raise _cancelled(reason)

    def _serve(
        self, payload: object, api_key: str | None, cancel: CancelToken, job: JobInfo | None
    ) -> dict:
        request = self.authorize(payload, api_key)
        if request.is_sequence:
            return self._sequence(request, cancel, job or JobInfo())
        intake = self._intake(payload, api_key, cancel, job, request)
        with ExitStack() as pinned:  # the model stays loaded while this request uses it
            with intake.timer.stage("load_model"):
                predictor = self._predictor(intake.model_id, pinned, cancel)
            self._check_model(intake, predictor)
            with intake.timer.stage("inference"), _forward_progress(predictor, [intake]):
                prediction = self._predict(predictor, intake.request, intake.images, cancel)
        return self._complete(intake, (predictor, prediction))

    def _intake(
        self,
        payload: object,
        api_key: str | None,
        cancel: CancelToken,
        job: JobInfo | None = None,
        request: RunRequest | None = None,
    ) -> _Intake:
        """The stages before the model: auth and the request (unless `request` is the payload
        already checked), the outputs the model can give, the images' headers, the budget, the
        pixels and the camera numbers."""
        intake = _Intake(_Timer(), time.perf_counter(), cancel, job or JobInfo())
        intake.progress = Progress(intake.job.progress)
        with intake.timer.stage("validate"):
            request = request or self.authorize(payload, api_key)
            if request.is_sequence:
                raise ServiceError(
                    "invalid_input", "a sequence (video) runs alone: send it with handle"
                )
            intake.model_id = self.model_key(request)
            intake.capabilities = _capabilities(intake.model_id)
            if intake.capabilities is not None:
                _check_outputs(request, intake.capabilities)
        with intake.timer.stage("decode"):
            intake.progress.update("downloading")
            opened = open_request_images(request, self.settings, cancel)
            sizes = [(view.width, view.height) for view in opened]
            scene_points = request.max_points if wants_points(request) else None
            gaussians = request.max_points if wants_gaussians(request) else None
            intake.cost = estimate_cost(
                intake.model_id, request.process_res, sizes, scene_points, gaussians
            )
            self.budget.check(intake.cost)
            intake.progress.update("decoding")
            intake.images = decode_request_images(opened, self.settings, cancel)
            sizes = [(image.width, image.height) for image in intake.images]
            intake.request = checked_cameras(request, sizes)
            intake.anchor_maps = decode_anchor_maps(
                request.anchors, len(sizes), self.settings.base64_chars_limit
            )
        return intake

    def _sequence(self, request: RunRequest, cancel: CancelToken, job: JobInfo) -> dict:
        """A video or `images` with `sequence`: the chunked path (sequence/pipeline.py)."""
        model_id = self.model_key(request)
        info = _capabilities(model_id)
        if info is not None and not info.camera:
            raise ServiceError(
                "invalid_input",
                f"{model_id} predicts no cameras, which a sequence needs to align its chunks: "
                "use a model with a camera (e.g. da3-small or da3-large)",
            )
        if info is not None:
            _check_outputs(request, info)  # e.g. gaussians_ply without the head

        def load(pinned: ExitStack) -> Predictor:
            predictor = self._predictor(model_id, pinned, cancel)
            _check_outputs(request, predictor.capabilities)  # what the loaded file holds
            return predictor

        self.store.maybe_prune()
        context = SequenceContext(
            self.settings, self.store, self.budget, model_id, load, cancel, job
        )
        return run_sequence(context, request)

    def _check_model(self, intake: _Intake, predictor: Predictor) -> None:
        """What needs the loaded model: its outputs again (what the loaded file holds decides,
        e.g. the 3D-Gaussian head) and whether it can give meters."""
        _check_outputs(intake.request, predictor.capabilities)
        _check_metric(intake.request, predictor)

    def _complete(self, intake: _Intake, outcome: tuple[Predictor, Prediction] | Exception) -> dict:
        """The stages after the model (encode, scene, respond, save); raises the request's
        error when `outcome` is one. A failed request leaves no file behind."""
        if isinstance(outcome, Exception):
            raise outcome
        predictor, prediction = outcome
        timer, request, images, cancel = intake.timer, intake.request, intake.images, intake.cancel
        self.store.maybe_prune()
        saved: list[Saved] = []
        try:
            cancel.check()
            fit = None
            if request.anchors is not None:
                with timer.stage("anchors"):
                    prediction, fit = fit_anchors(request.anchors, intake.anchor_maps, prediction)
            intake.progress.update("encoding")
            with timer.stage("encode"):
                artifacts, warnings = encode_outputs(request, prediction, images)
            if wants_scene(request):
                cancel.check()
                with timer.stage("scene"):
                    scene, scene_warnings = encode_scene(request, prediction, images)
                artifacts, warnings = [*artifacts, *scene], [*warnings, *scene_warnings]
            cancel.commit()  # the last check: files are written from here on
            intake.progress.update("uploading")
            response = self._respond(
                request, predictor, prediction, artifacts, timer, saved, warnings, intake.job
            )
            if fit is not None:
                response["anchors"] = fit
            response["scale"] = _scale_report(prediction.scale, fit)
            check_finite(response)
        except BaseException:
            self.store.discard(saved)
            raise
        timer.timings_ms["total"] = round((time.perf_counter() - intake.started) * 1000, 3)
        response["timings_ms"] = timer.timings_ms
        return response

    def discard(self, response: Response) -> None:
        """Remove what a response saved, for a result nobody will receive (its job was
        cancelled past its last check): its volume files and bucket objects, as the service
        recorded them while saving."""
        self.store.discard(response.saved)

    # ---- several requests, forwards shared ----------------------------------------------

    def batch_key(self, request: RunRequest) -> tuple | None:
        """Requests with the same key may share a forward (`handle_batch`): the model and the
        flags the forward takes; None for a request that runs alone (several views, or poses
        to condition on). Images of different network sizes still run apart within a batch."""
        single = request.images is None or len(request.images) == 1
        if not single or request.extrinsics is not None or request.is_sequence:
            return None
        return (
            self.model_key(request),
            request.process_res,
            request.use_ray_pose,
            wants_gaussians(request),
        )

    def handle_batch(self, items: Sequence[BatchItem]) -> list[dict | Exception]:
        """Serve several requests, each `(payload, api_key, cancel)` as for `handle`, sharing
        forwards where they can (`Predictor.predict_batch`). Auth, decoding, encoding and
        placement are per request, and so is cancelling (a shared forward stops once all of
        its requests are cancelled); one request's failure never fails another. Returns, in
        order, each response dict or its error: a `ServiceError`, or an unexpected exception
        the transport logs and answers as `internal`."""
        items = [_batch_item(*item) for item in items]
        with ThreadPoolExecutor(max_workers=_POOL_THREADS) as pool:
            results: list = list(pool.map(lambda item: _outcome(self._intake, *item), items))
            for indices in self._rounds(results):
                intakes = [results[i] for i in indices]
                outcomes = self._predict_batch(intakes[0].model_id, intakes)
                done = pool.map(lambda i, o: _outcome(self._complete, i, o), intakes, outcomes)
                for index, result in zip(indices, done, strict=True):
                    results[index] = result
        return [_cancelled(str(r)) if isinstance(r, Cancelled) else r for r in results]

    def _rounds(self, intakes: list) -> list[list[int]]:
        """Indices of the admitted requests (the `_Intake`s among `intakes`) in rounds that
        run one after another, in request order: one model each, at most `MAX_BATCH`
        requests, and within the request budget together (it applies per batch)."""
        rounds: list[list[int]] = []
        open_rounds: dict[str, list[int]] = {}
        for index, intake in enumerate(intakes):
            if not isinstance(intake, _Intake):
                continue
            current = open_rounds.get(intake.model_id)
            costs = [intakes[i].cost for i in current or []] + [intake.cost]
            if current is None or not self._fits(costs):
                current = open_rounds[intake.model_id] = []
                rounds.append(current)
            current.append(index)
        return rounds

    def _fits(self, costs: list[RequestCost]) -> bool:
        """Whether requests of these costs may run as one batch."""
        return (
            len(costs) <= self.settings.max_batch
            and sum(cost.tokens for cost in costs) <= self.budget.tokens
            and sum(cost.host_pixels for cost in costs) <= self.budget.pixels
        )

    def authorize(self, payload: object, api_key: str | None = None) -> RunRequest:
        """Check the key (the payload's `api_key` wins over `api_key` from transport headers),
        then the request; raises ServiceError. Auth comes first so an unauthenticated caller
        learns nothing about the request format."""
        body_key = payload.get("api_key") if isinstance(payload, dict) else None
        # An empty body key counts as absent; any other body key wins over the headers'.
        check_api_key(
            body_key if isinstance(body_key, str) and body_key else api_key, self.settings
        )
        return parse_request(payload, self.settings)

    @property
    def default_model_id(self) -> str:
        return canonical_model_id(self.settings.model_id)

    def model_key(self, request: RunRequest) -> str:
        """The cache (and queue) key of the requested model. Clients pick from the table
        only; the operator's MODEL_ID may also be a local snapshot folder."""
        if request.model_id is None:
            return self.default_model_id
        info = lookup_model(request.model_id)
        if info is None:
            raise ServiceError(
                "unsupported_model",
                f"model_id {request.model_id[:100]!r} is not a DA3 model: use one of "
                f"{', '.join(valid_model_ids())} (short names such as 'da3-small' work too)",
            )
        return info.repo_id

    def _predictor(
        self, model_id: str, pinned: ExitStack, cancel: CancelToken | CancelGroup | None = None
    ) -> Predictor:
        """The loaded model, pinned in the cache until `pinned` closes (a cancelled job stops
        waiting for memory)."""
        check = cancel.check if cancel is not None else None
        try:
            return pinned.enter_context(self.model_cache.use(model_id, check))
        except ModelNotFoundError as error:  # the details (server paths) go to the log only
            log.warning("%s", error)
            raise ServiceError(
                "model_unavailable",
                f"{model_id} is not available on this server (its weights are not on disk and "
                "could not be downloaded): choose a model that GET /models marks available",
            ) from None
        except torch.cuda.OutOfMemoryError:
            self.model_cache.evict_all_except(None)
            raise ServiceError(
                "out_of_memory",
                f"not enough GPU memory to load {model_id}; retry, or use a smaller model",
            ) from None
        except (ValueError, OSError) as error:
            log.exception("loading %s failed", model_id)
            raise ServiceError(
                "model_unavailable", f"model {model_id} could not be loaded: {error}"
            ) from None

    def _predict(
        self,
        predictor: Predictor,
        request: RunRequest,
        images: list[DecodedImage],
        cancel: CancelToken | None = None,
    ) -> Prediction:
        try:
            return predictor.predict(**vars(_predict_request(request, images)), cancel=cancel)
        except ValueError as error:
            raise ServiceError("invalid_input", str(error)) from None
        except torch.cuda.OutOfMemoryError:
            self.model_cache.evict_all_except(predictor.model_id)
            raise ServiceError(
                "out_of_memory",
                "the GPU ran out of memory for this request: lower process_res, send fewer "
                "views, or retry",
            ) from None

    def _predict_batch(
        self, model_id: str, intakes: list[_Intake]
    ) -> list[tuple[Predictor, Prediction] | Exception]:
        """One round of one model's requests through `Predictor.predict_batch`, the model
        pinned meanwhile: (predictor, prediction) or the request's error each. Every
        request's timings get the shared stages."""
        # Work shared by the round stops once every one of its requests is cancelled.
        shared = CancelGroup([intake.cancel for intake in intakes])
        with ExitStack() as pinned:  # the model stays loaded while the round uses it
            load_started = time.perf_counter()
            try:
                predictor = self._predictor(model_id, pinned, shared)
            except (ServiceError, Cancelled) as error:
                return [error] * len(intakes)
            loading = time.perf_counter() - load_started
            outcomes: list = [_outcome(self._check_model, i, predictor) for i in intakes]
            ready = [i for i, outcome in enumerate(outcomes) if outcome is None]
            inference_started = time.perf_counter()
            with _forward_progress(predictor, [intakes[i] for i in ready]):
                predictions = predictor.predict_batch(
                    [_predict_request(intakes[i].request, intakes[i].images) for i in ready],
                    return_exceptions=True,
                    cancel=[intakes[i].cancel for i in ready],
                )
            inference = time.perf_counter() - inference_started
        for index, prediction in zip(ready, predictions, strict=True):
            outcomes[index] = (
                self._prediction_error(predictor, prediction)
                if isinstance(prediction, Exception)
                else (predictor, prediction)
            )
        for intake in intakes:
            intake.timer.add("load_model", loading)
            intake.timer.add("inference", inference)
        return outcomes

    def _prediction_error(self, predictor: Predictor, error: Exception) -> Exception:
        """A `predict_batch` error as `_predict` maps it: bad arguments are `invalid_input`,
        GPU memory `out_of_memory` (after freeing the other models); others unchanged."""
        if isinstance(error, ValueError):
            return ServiceError("invalid_input", str(error))
        if isinstance(error, torch.cuda.OutOfMemoryError):
            self.model_cache.evict_all_except(predictor.model_id)
            return ServiceError(
                "out_of_memory",
                "the GPU ran out of memory for this request, even run alone: lower "
                "process_res, send a smaller image, or retry",
            )
        return error

    def _respond(
        self,
        request: RunRequest,
        predictor: Predictor,
        prediction: Prediction,
        artifacts: list[Artifact],
        timer: _Timer,
        saved: list[Saved],
        warnings: list[str],
        job: JobInfo | None = None,
    ) -> Response:
        views = [view_skeleton(prediction, index) for index in range(len(prediction))]
        with timer.stage("save"):
            placed = place_outputs(
                artifacts, len(views), self.store,
                budget=self.settings.max_response_bytes, paths=not request.return_base64,
                order=request.outputs, saved=saved, warnings=warnings, job=job,
            )  # fmt: skip
        for view, fields in zip(views, placed.views, strict=True):
            view.update(fields)
        response = Response({
            "schema_version": SCHEMA_VERSION,
            "model_id": predictor.model_id,
            "is_metric": prediction.is_metric,
            "units": prediction.units,
            **views[0],
            "views": views if len(views) > 1 else None,
            **placed.top,
            "warnings": list(dict.fromkeys(warnings)),
        })  # fmt: skip
        response.saved = saved  # the same list: whatever is saved after this is in it too
        return response

    def _load(self, model_id: str) -> Predictor:
        predictor = Predictor.from_pretrained(
            model_id,
            device=self.settings.device,
            dtype=_dtype(self.settings.dtype),
            locator=self.locator,
        )
        if self.settings.compile:
            predictor.compile(self.settings.compile_cache_dir)
        return predictor

    def _model_dtype(self) -> torch.dtype:
        """The compute dtype models load in (DA3_DTYPE, else the device's default)."""
        device = torch.device(
            self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        return _dtype(self.settings.dtype) or default_dtype(device)

    def _budget_bytes(self) -> int:
        if self.settings.model_memory_budget_gb is not None:
            return int(self.settings.model_memory_budget_gb * 1024**3)
        return default_budget_bytes(self._device())

    def _device(self) -> torch.device:
        return torch.device(
            self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )

    def _request_budget(self) -> Budget:
        """REQUEST_BUDGET_TOKENS / _PIXELS, else the device's default (api/budget.py)."""
        tokens, pixels = self.settings.request_budget_tokens, self.settings.request_budget_pixels
        return request_budget(tokens, pixels, self._device_budget)

    def _device_budget(self) -> Budget:
        device = self._device()
        gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return default_budget(device.type, gpu_free, self.model_cache.budget_bytes, host)


# Threads for the per-request stages of a batch (decoding, encoding): Pillow and zlib release
# the GIL, so a batch's requests decode and encode side by side.
_POOL_THREADS = 4


@dataclass
class _Intake:
    """One request between its stages: timings so far, its cancel flag, the checked request,
    its model and what it can give (None when unknown before loading), its cost (priced from
    the image headers) and its decoded views."""

    timer: _Timer
    started: float
    cancel: CancelToken
    job: JobInfo = field(default_factory=JobInfo)
    progress: Progress = field(default_factory=lambda: Progress(None))
    request: RunRequest | None = None
    model_id: str = ""
    capabilities: ModelInfo | None = None
    cost: RequestCost | None = None
    images: list[DecodedImage] = field(default_factory=list)
    anchor_maps: list = field(default_factory=list)


class Response(dict):
    """A v1 response (a plain dict on the wire) that remembers what its request saved on the
    volume and in the bucket, so that `Service.discard` can remove all of it."""

    saved: list[Saved]


# A request of `Service.handle_batch`: the payload, the key from transport headers, the job's
# cancel flag (None: never cancelled) and, optionally, its `JobInfo`.
BatchItem = (
    tuple[object, str | None, CancelToken | None]
    | tuple[object, str | None, CancelToken | None, JobInfo | None]
)


def _batch_item(
    payload: object,
    api_key: str | None,
    cancel: CancelToken | None = None,
    job: JobInfo | None = None,
) -> tuple[object, str | None, CancelToken, JobInfo]:
    """A `BatchItem` with its defaults filled in."""
    return payload, api_key, cancel or CancelToken(), job or JobInfo()


@contextmanager
def _forward_progress(predictor: Predictor, intakes: list[_Intake]) -> Iterator[None]:
    """The forward's stage in each request's progress: started, then block k of n."""
    for intake in intakes:
        intake.progress.update("forward")

    def report(done: int, total: int) -> None:
        for intake in intakes:
            intake.progress.update("forward", done, total)

    with block_progress(predictor.network, report):
        yield


def _scale_report(scale: dict | None, fit: dict | None) -> dict:
    """Where the answer's scale came from: the prediction's own source (model, focal length,
    poses or none), or the anchors' fit with the source it replaced."""
    report = dict(scale or {"source": "none"})
    if fit is not None and fit["fitted"]:
        return {"source": "anchors", "anchors_scale": fit["scale"], "before_anchors": report}
    return report


def _cancelled(reason: str) -> ServiceError:
    """The error of a request stopped by its cancel flag."""
    return ServiceError("cancelled", f"{reason}: it stopped before it finished, saving nothing")


def _outcome(fn, *args):
    """fn(*args), or the exception it raised (a batch keeps going past one request's error)."""
    try:
        return fn(*args)
    except Exception as error:
        return error


def _predict_request(request: RunRequest, images: list[DecodedImage]) -> PredictRequest:
    """The `Predictor.predict` arguments of one request (alone or in a batch)."""
    return PredictRequest(
        [image.image for image in images],
        process_res=request.process_res,
        use_ray_pose=request.use_ray_pose,
        intrinsics=request.intrinsics,
        extrinsics=request.extrinsics,
        focal_length_px=request.focal_length_px,
        metric=request.output_metric,
        exif_focal_length_px=[image.focal_length_px for image in images],
        gaussians=wants_gaussians(request),
    )


def _check_metric(request: RunRequest, predictor: Predictor) -> None:
    """An explicit `output_metric: true` needs a model that can give meters; left at its
    default, a relative model answers with `units: "relative"`."""
    explicit = "output_metric" in request.model_fields_set
    if explicit and request.output_metric and not (predictor.is_metric or predictor.needs_focal):
        metric = [m.repo_id for m in MODELS if m.can_give_meters]
        raise ServiceError(
            "invalid_input",
            f"{predictor.model_id} gives relative depth only, but output_metric is true: use "
            f"a metric model ({', '.join(metric)}) or set output_metric to false",
        )


def _capabilities(model_id: str) -> ModelInfo | None:
    """What the model can give, known before loading it: from the model table, or from the
    preset named in a snapshot folder's config.json and, for the 3D Gaussians, the keys in its
    checkpoint's header; None when neither says. (The loaded model's own capabilities are
    checked again once it is loaded: a file decides, not its name.)"""
    info = lookup_model(model_id)
    if info is None and Path(model_id).is_dir():
        try:
            info = lookup_model(read_preset(model_id))
            info = replace(info, gaussians=holds_gaussians(model_id))
        except CheckpointError:
            return None
    return info


def _check_outputs(request: RunRequest, capabilities: ModelInfo) -> None:
    """Outputs the model cannot give are refused (the one rule for every output)."""
    reasons = unavailable_outputs(request, capabilities)
    if reasons:
        raise ServiceError(
            "invalid_input",
            "this request asks for outputs the model cannot give: " + "; ".join(reasons),
        )


def warm_up(predictor: Predictor) -> None:
    """One small forward pass, so the first request does not pay for lazy initialisation."""
    pixels = np.zeros((280, 280, 3), dtype=np.uint8)
    pixels[::2] = 255
    predictor.predict(pixels, process_res=280, focal_length_px=300.0)


def _dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype named by DA3_DTYPE (checked and made canonical in config.py)."""
    return None if name is None else getattr(torch, name)


def check_finite(response: object, where: str = "response") -> None:
    """Raise `ServiceError("internal")` (the place logged) if the response holds NaN or an
    infinity anywhere: JSON cannot carry them, so such a response could not be sent."""
    if isinstance(response, float) and not math.isfinite(response):
        log.error("non-finite number %r at %s of a response", response, where)
        raise ServiceError(
            "internal",
            f"the result held a non-finite number (at {where}); this is a bug, the server log "
            "has the details",
        )
    if isinstance(response, dict):
        for key, value in response.items():
            check_finite(value, f"{where}.{key}")
    elif isinstance(response, list):
        for index, value in enumerate(response):
            check_finite(value, f"{where}[{index}]")
