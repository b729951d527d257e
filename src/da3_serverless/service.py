"""The service, free of any transport: request -> auth -> images -> predictor -> outputs ->
storage -> response. Transports (RunPod worker, HTTP server, CLI) call `Service.handle`."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from da3_serverless.api.auth import check_api_key
from da3_serverless.api.budget import Budget, default_budget, estimate_cost, request_budget
from da3_serverless.api.cameras import checked_cameras
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.images import DecodedImage, decode_request_images, open_request_images
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
from da3_serverless.inference.catalog import MODELS, ModelInfo, lookup_model, valid_model_ids
from da3_serverless.inference.prediction import Prediction
from da3_serverless.inference.predictor import Predictor, default_dtype
from da3_serverless.inference.weights import ModelNotFoundError, WeightLocator
from da3_serverless.model.checkpoint import CheckpointError, holds_gaussians, read_preset

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
            elapsed = (time.perf_counter() - start) * 1000
            self.timings_ms[name] = round(self.timings_ms.get(name, 0.0) + elapsed, 3)


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
        with self.model_cache.use(self.default_model_id) as predictor:
            if self.settings.warmup:
                warm_up(predictor)
        self._ready = True

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
            }
            for info in MODELS
        ]

    # ---- one request ---------------------------------------------------------------------

    def handle(self, payload: object, api_key: str | None = None) -> dict:
        """Serve one v1 request (the RunPod `input` object); `api_key` comes from transport
        headers and is used when the payload has none. Returns the response dict; raises
        ServiceError. A failed request leaves no file behind."""
        timer = _Timer()
        started = time.perf_counter()
        with timer.stage("validate"):
            request = self.authorize(payload, api_key)
            model_id = self.model_key(request)
            capabilities = _capabilities(model_id)
            if capabilities is not None:
                _check_outputs(request, capabilities)
        with timer.stage("decode"):
            opened = open_request_images(request, self.settings)
            sizes = [(view.width, view.height) for view in opened]
            scene_points = request.max_points if wants_points(request) else None
            gaussians = request.max_points if wants_gaussians(request) else None
            cost = estimate_cost(model_id, request.process_res, sizes, scene_points, gaussians)
            self.budget.check(cost)
            images = decode_request_images(opened, self.settings)
            request = checked_cameras(request, [(image.width, image.height) for image in images])
        with ExitStack() as pinned:  # the model stays loaded while this request uses it
            with timer.stage("load_model"):
                predictor = self._predictor(model_id, pinned)
            _check_outputs(request, predictor.capabilities)  # again: what the file holds
            _check_metric(request, predictor)
            with timer.stage("inference"):
                prediction = self._predict(predictor, request, images)
        self.store.maybe_prune()
        saved: list[Saved] = []
        try:
            with timer.stage("encode"):
                artifacts, warnings = encode_outputs(request, prediction, images)
            if wants_scene(request):
                with timer.stage("scene"):
                    scene, scene_warnings = encode_scene(request, prediction, images)
                artifacts, warnings = [*artifacts, *scene], [*warnings, *scene_warnings]
            response = self._respond(
                request, predictor, prediction, artifacts, timer, saved, warnings
            )
            check_finite(response)
        except BaseException:
            self.store.discard(saved)
            raise
        timer.timings_ms["total"] = round((time.perf_counter() - started) * 1000, 3)
        response["timings_ms"] = timer.timings_ms
        return response

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

    def _predictor(self, model_id: str, pinned: ExitStack) -> Predictor:
        """The loaded model, pinned in the cache until `pinned` closes."""
        try:
            return pinned.enter_context(self.model_cache.use(model_id))
        except ModelNotFoundError as error:
            raise ServiceError("model_unavailable", str(error)) from None
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
    ) -> Prediction:
        try:
            return predictor.predict(
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
        except ValueError as error:
            raise ServiceError("invalid_input", str(error)) from None
        except torch.cuda.OutOfMemoryError:
            self.model_cache.evict_all_except(predictor.model_id)
            raise ServiceError(
                "out_of_memory",
                "the GPU ran out of memory for this request: lower process_res, send fewer "
                "views, or retry",
            ) from None

    def _respond(
        self,
        request: RunRequest,
        predictor: Predictor,
        prediction: Prediction,
        artifacts: list[Artifact],
        timer: _Timer,
        saved: list[Saved],
        warnings: list[str],
    ) -> dict:
        views = [view_skeleton(prediction, index) for index in range(len(prediction))]
        with timer.stage("save"):
            placed = place_outputs(
                artifacts, len(views), self.store,
                budget=self.settings.max_response_bytes if request.return_base64 else None,
                order=request.outputs, saved=saved, warnings=warnings,
            )  # fmt: skip
        for view, fields in zip(views, placed.views, strict=True):
            view.update(fields)
        return {
            "schema_version": SCHEMA_VERSION,
            "model_id": predictor.model_id,
            "is_metric": prediction.is_metric,
            "units": prediction.units,
            **views[0],
            "views": views if len(views) > 1 else None,
            **placed.top,
            "warnings": list(dict.fromkeys(warnings)),
        }

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
