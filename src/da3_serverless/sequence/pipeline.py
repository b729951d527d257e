"""The chunked path of a sequence request (docs/ARCHITECTURE.md §8): frames in overlapping
chunks through the predictor, each chunk aligned to the one before (`Assembler`), its owned
frames written to disk as they come (memory stays flat), a summary per chunk to the job's
progress, then the outputs that share one decode written in a second pass. The `Service`
calls `run_sequence` for a request with `is_sequence`; nothing here knows a transport."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from da3_serverless.api.budget import HOST_BYTES_PER_PIXEL, Budget, estimate_cost
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.job import JobInfo
from da3_serverless.api.outputs import EXTRAS, Artifact, wants_gaussians, wants_points
from da3_serverless.api.placement import place_outputs
from da3_serverless.api.schema import GAUSSIAN_OUTPUT, SCENE_OUTPUTS, SCHEMA_VERSION, RunRequest
from da3_serverless.api.storage import OutputStore, Saved
from da3_serverless.config import Settings
from da3_serverless.exports.gaussians import FILE_BYTES_PER_GAUSSIAN
from da3_serverless.inference.cancel import CancelToken
from da3_serverless.inference.prediction import Prediction
from da3_serverless.inference.predictor import Predictor
from da3_serverless.sequence.assemble import AlignedChunk, Assembler
from da3_serverless.sequence.gaussians import GaussianCollector
from da3_serverless.sequence.outputs import (
    FrameStore,
    depth_frames_zip,
    depth_video_mkv,
    preview_video_webm,
    trajectory_zip,
)
from da3_serverless.sequence.plan import Chunk, default_overlap, windows
from da3_serverless.sequence.scene import SceneCollector
from da3_serverless.sequence.source import FrameSource, open_source

log = logging.getLogger(__name__)
# The largest default chunk (DA3-Streaming's); the request budget may admit fewer.
MAX_DEFAULT_CHUNK = 120


@dataclass
class SequenceContext:
    """What the pipeline needs of the service: settings, output store, request budget, the
    model's id and a loader that pins it (`load(pinned)`) while the stack is open."""

    settings: Settings
    store: OutputStore
    budget: Budget
    model_id: str
    load: Callable[[ExitStack], Predictor]
    cancel: CancelToken
    job: JobInfo = field(default_factory=JobInfo)


def run_sequence(context: SequenceContext, request: RunRequest) -> dict:
    """Serve a sequence request: returns the response dict; raises `ServiceError` or
    `Cancelled`. Every file of the job (its frames on disk, its saved outputs) is removed
    when it fails or is cancelled."""
    started = time.perf_counter()
    frames = FrameStore.create(context.settings.workspace_dir / "sequences")
    source = None
    try:
        source = open_source(request, context.settings, context.cancel)
        size, overlap = _chunking(context, request, source)
        with ExitStack() as pinned:
            predictor = context.load(pinned)
            model_id = predictor.model_id
            summaries, is_metric, units = _run_chunks(
                context, request, predictor, source, frames, (size, overlap)
            )
        _check_sizes(request, frames)
        context.cancel.commit()  # the last check: outputs are written from here on
        response = _respond(context, request, frames, (model_id, is_metric, units))
        response["warnings"] = list(dict.fromkeys([*source.warnings, *response["warnings"]]))
        response["sequence"] = {
            "frames": len(frames),
            "chunk_size": size,
            "overlap": overlap,
            "timestamps": frames.timestamps,
            "chunks": summaries,
        }
        response["timings_ms"] = {"total": round((time.perf_counter() - started) * 1000, 3)}
        return response
    finally:
        if source is not None:
            source.close()
        frames.close()


def _check_sizes(request: RunRequest, frames: FrameStore) -> None:
    """The videos need frames of one size (photos of a sequence may differ)."""
    videos = [name for name in ("depth_video", "preview_video") if name in request.outputs]
    if videos and len(frames.sizes) > 1:
        raise ServiceError(
            "invalid_input",
            f"{', '.join(videos)} need frames of one size, but the images differ: ask for "
            "depth_frames instead, or send images of one size",
        )


def _chunking(context: SequenceContext, request: RunRequest, source: FrameSource):
    """(chunk_size, overlap): the request's, else the largest chunk the budget admits (at
    most MAX_DEFAULT_CHUNK) and half of it; a chunk of the chosen size must fit the budget."""
    size = request.chunk_size or _largest_chunk(context, request, source)
    context.budget.check(_chunk_cost(context, request, source, size))  # priced per chunk
    overlap = request.overlap or max(default_overlap(size), 1)
    if overlap >= size:
        raise ServiceError(
            "invalid_input", f"overlap {overlap} must be less than chunk_size {size}"
        )
    return size, overlap


def _largest_chunk(context: SequenceContext, request: RunRequest, source: FrameSource) -> int:
    best = 2
    for size in range(2, MAX_DEFAULT_CHUNK + 1):
        cost = _chunk_cost(context, request, source, size)
        if cost.tokens > context.budget.tokens or cost.host_pixels > context.budget.pixels:
            break
        best = size
    return best


def _chunk_cost(context: SequenceContext, request: RunRequest, source: FrameSource, size: int):
    """A chunk of `size` frames priced as a request of those frames, with its scene outputs
    and Gaussians as a single request prices them: `scene_ply`, `scene_glb`, `colmap` (every
    pixel fused, up to `max_points` in the files: the files' bound counted once, as the
    sequence writes them once) and `gaussians_ply` (every frame's cells held and filtered, up
    to `max_points` written), except that the one Gaussians' file written at the end holds up
    to `max_points` of every planned frame's cells, not of one chunk's. What the collectors
    hold (at most HOLD x max_points kept items between chunks, HOLD + 2 while one joins,
    `sequence/share.py`)
    fits in the files' price, which is not held until the files are written."""
    points = request.max_points if wants_points(request) else None
    gaussians = request.max_points if wants_gaussians(request) else None
    frames = [(source.width, source.height)] * size
    cost = estimate_cost(context.model_id, request.process_res, frames, points, gaussians)
    if gaussians is None:
        return cost
    per_frame = cost.grid[0] * cost.grid[1]
    written = min(gaussians, source.planned * per_frame) - min(gaussians, size * per_frame)
    extra = math.ceil(max(written, 0) * FILE_BYTES_PER_GAUSSIAN / HOST_BYTES_PER_PIXEL)
    return replace(cost, gaussian_pixels=cost.gaussian_pixels + extra)


def _run_chunks(context, request, predictor, source, frames, chunking):
    """Every chunk through the predictor and the assembler; its owned frames into `frames`.
    Returns (chunk summaries, is_metric, units)."""
    size, overlap = chunking
    assembler = Assembler(overlap)
    if wants_points(request):
        frames.scene = SceneCollector(request)
    if wants_gaussians(request):
        frames.gaussians = GaussianCollector(request)
    frames.keep_images = "colmap" in request.outputs
    summaries: list[dict] = []
    is_metric, units = False, "relative"
    started = time.perf_counter()
    for chunk, items in windows(source.frames, size, overlap):
        context.cancel.check()
        prediction = _predict(predictor, request, chunk, [f.image for f in items], context)
        aligning = time.perf_counter()
        aligned = assembler.add(chunk, prediction)
        aligning = time.perf_counter() - aligning
        timestamps = [f.timestamp for f in items[chunk.overlap :]]
        owned = [f.image for f in items[chunk.overlap :]]
        _write(frames, aligned, timestamps, owned)
        if frames.scene is not None:
            sky = None if prediction.sky is None else prediction.sky[chunk.overlap :]
            frames.scene.add(aligned, sky, owned)
        if frames.gaussians is not None:
            frames.gaussians.add(aligned, prediction)
        is_metric, units = prediction.is_metric, prediction.units
        summary = _summary(aligned, len(frames), source, time.perf_counter() - started)
        summary["align_ms"] = round(aligning * 1000, 3)
        summaries.append(summary)
        if context.job.progress is not None:
            context.job.progress(summary)
        del prediction, aligned
    return summaries, is_metric, units


def _predict(
    predictor: Predictor, request: RunRequest, chunk: Chunk, images: list, context
) -> Prediction:
    intrinsics = None
    if request.intrinsics is not None:
        given = request.intrinsics
        intrinsics = [
            given[0] if len(given) == 1 else given[i] for i in range(chunk.start, chunk.stop)
        ]
    try:
        prediction = predictor.predict(
            images, process_res=request.process_res, use_ray_pose=request.use_ray_pose,
            intrinsics=intrinsics, focal_length_px=request.focal_length_px,
            metric=request.output_metric, cancel=context.cancel,
            gaussians=wants_gaussians(request),
        )  # fmt: skip
    except ValueError as error:
        raise ServiceError("invalid_input", str(error)) from None
    if prediction.extrinsics is None or prediction.intrinsics is None:
        raise ServiceError(
            "invalid_input",
            f"{predictor.model_id} predicts no cameras, which a sequence needs to align its "
            "chunks: use a model with a camera (e.g. da3-small, da3-large, da3nested-giant-large)",
        )
    return prediction


def _write(frames: FrameStore, aligned: AlignedChunk, timestamps: list[float], images) -> None:
    outputs = aligned.outputs
    for offset, timestamp in enumerate(timestamps):
        frames.add(
            timestamp, outputs.depth[offset], outputs.intrinsics[offset],
            outputs.extrinsics[offset], images[offset],
        )  # fmt: skip


def _summary(aligned: AlignedChunk, done: int, source: FrameSource, elapsed: float) -> dict:
    """A chunk's progress: `percent` only when the source knows its frame count (a stream
    that declares no duration has only a cap: `frames_planned` is then that cap)."""
    chunk, planned = aligned.chunk, source.planned
    known = source.planned_known and planned > 0
    message = f"chunk {chunk.index}: {done} of {planned} frames"
    if not known:
        message = f"chunk {chunk.index}: {done} frames (the video declares no length)"
    return {
        "stage": "sequence",
        "percent": min(100, round(100 * done / planned)) if known else None,
        "message": message,
        "chunk": chunk.index,
        "start": chunk.start,
        "stop": chunk.stop,
        "frames_done": done,
        "frames_planned": planned,
        "scale": float(aligned.transform.scale),
        "residual": float(aligned.residual),
        "inliers": float(aligned.inliers),
        "elapsed_s": round(elapsed, 3),
    }


def _respond(context: SequenceContext, request: RunRequest, frames: FrameStore, model) -> dict:
    """The response: the frames' size and depth range, the requested files placed."""
    model_id, is_metric, units = model
    artifacts = [_artifact(name, frames, units) for name in request.outputs if name in WRITERS]
    scene = None
    if frames.scene is not None:
        scene = frames.scene.summary()
        for name in (name for name in request.outputs if name in SCENE_OUTPUTS):
            data = frames.scene.write(name, frames, units)
            artifacts.append(Artifact(None, name, data, *EXTRAS[name]))
    warnings: list[str] = []
    if frames.gaussians is not None:
        data = frames.gaussians.write(units)
        fields = {"gaussians": frames.gaussians.summary()}
        artifacts.append(Artifact(None, GAUSSIAN_OUTPUT, data, *EXTRAS[GAUSSIAN_OUTPUT], fields))
        warnings += frames.gaussians.warnings
    saved: list[Saved] = []
    try:
        placed = place_outputs(
            artifacts, 1, context.store,
            budget=context.settings.max_response_bytes, paths=not request.return_base64,
            order=request.outputs, saved=saved, warnings=warnings, job=context.job,
        )  # fmt: skip
    except BaseException:
        context.store.discard(saved)
        raise
    low, high = frames.depth_range()
    width, height = frames.size or (0, 0)
    return {
        "schema_version": SCHEMA_VERSION, "model_id": model_id, "is_metric": is_metric,
        "units": units, "width": width, "height": height, "min_depth": low, "max_depth": high,
        **placed.top, "scene": scene, "warnings": list(dict.fromkeys(warnings)),
    }  # fmt: skip


# sequence output -> (writer, file suffix, media type)
WRITERS = {
    "trajectory": (trajectory_zip, ".zip", "application/zip"),
    "depth_frames": (depth_frames_zip, ".zip", "application/zip"),
    "depth_video": (depth_video_mkv, ".mkv", "video/x-matroska"),
    "preview_video": (preview_video_webm, ".webm", "video/webm"),
}


def _artifact(name: str, frames: FrameStore, units: str) -> Artifact:
    """The output `name` as a file in the store's folder, never read here: placement reads it
    only to put it inline, else moves it to the volume (the folder goes with `close`)."""
    write, suffix, media_type = WRITERS[name]
    target = write(frames, units, Path(frames.folder) / f"{name}{suffix}")
    return Artifact(None, name, target, suffix, media_type)
