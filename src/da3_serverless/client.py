"""Python client for both deployments (the `da3-serverless request` command is in cli.py).

`Client(endpoint)` talks to a self-hosted server (`http://host:8000`), a RunPod endpoint
(`https://api.runpod.ai/v2/<id>`, with `runpod_api_key`) or RunPod's local test API. All three
take RunPod's `{"input": {...}}` at `POST /runsync` and answer `{"id", "status", "output" |
"error"}`, so the client speaks only that form: it polls `GET /status/<id>` while the job is
IN_QUEUE/IN_PROGRESS and turns failures (our error object, as JSON text or as an object) into
`DA3Error(code, status, message)`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

from da3_serverless.exports.encoding import decode_depth_png16

if TYPE_CHECKING:
    from da3_serverless.batch import BatchItem, BatchReport

ImageInput = str | Path | bytes | Image.Image
# Output name -> the fixed file suffix `DepthResult.save_all` writes it under (never a name the
# server chose). Per view: "<stem>.<suffix>" (one view) or "<stem>.view<i>.<suffix>"; the scene
# outputs (top level only): "<stem>.<suffix>".
VIEW_FILES = {
    "depth": "depth.png",
    "preview": "preview.png",
    "confidence": "confidence.png",
    "sky_mask": "sky.png",
    "depth_npy": "depth.npy",
    "pointcloud": "ply",
    "confidence_npy": "confidence.npy",
    "depth_exr": "depth.exr",
    "depth_mm_png": "depth_mm.png",
}
SCENE_FILES = {
    "scene_ply": "scene.ply",
    "scene_glb": "glb",
    "colmap": "colmap.zip",
    "gaussians_ply": "gaussians.ply",
}
# A sequence's files (`SequenceResult.save_all`): its own outputs, and the scene's as above.
SEQUENCE_FILES = {
    "trajectory": "trajectory.zip",
    "depth_frames": "depth_frames.zip",
    "depth_video": "depth_video.mkv",
    "preview_video": "preview_video.webm",
    **SCENE_FILES,
}
# Worth retrying: the server is busy or out of memory for now (a missing model is not).
TRANSIENT_CODES = ("overloaded", "out_of_memory")
PENDING = ("IN_QUEUE", "IN_PROGRESS")
# The largest bodies RunPod takes (bytes): 10 MB on /run, 20 MB on /runsync.
RUN_MAX_BODY_BYTES, RUNSYNC_MAX_BODY_BYTES = 10_000_000, 20_000_000
MAX_POLICY_MS = 7 * 24 * 3_600_000  # RunPod's longest ttl / executionTimeout: 7 days


class DA3Error(Exception):
    """A failed request: the service's error `code` (or a transport one such as `http_error`,
    `timeout`, `runpod_failed`), the HTTP-like `status` (None when unknown) and the message."""

    def __init__(self, code: str, status: int | None, message: str):
        super().__init__(f"{code} ({status}): {message}")
        self.code = code
        self.status = status
        self.message = message


def _output(name: str) -> property:
    return property(
        lambda self: self.outputs.get(name),
        doc=f"The `{name}` file's bytes; None when not requested or not inline.",
    )


@dataclass
class DepthResult:
    """One view's result. `depth` is (H, W) float32 in `units` (meters when `is_metric`),
    decoded from `depth_npy` when requested (exact) else from the 16-bit PNG; None when the
    server returned paths instead of base64. `outputs` holds each inline output's bytes by name
    (`preview` PNG, `depth_npy`, `pointcloud` PLY, ...; the top-level result also holds the
    scene outputs `scene_ply`, `scene_glb`, `colmap`, `gaussians_ply`), also readable as
    attributes."""

    depth: np.ndarray | None
    width: int
    height: int
    min_depth: float
    max_depth: float
    intrinsics: np.ndarray | None  # (3, 3), pixels
    extrinsics: np.ndarray | None  # (3, 4), world-to-camera
    depth_png: bytes | None
    outputs: dict[str, bytes]
    raw: dict[str, Any]
    is_metric: bool = False
    units: str = "relative"
    model_id: str = ""
    views: list[DepthResult] = field(default_factory=list)

    preview = _output("preview")
    confidence = _output("confidence")
    sky_mask = _output("sky_mask")
    depth_npy = _output("depth_npy")
    pointcloud = _output("pointcloud")
    confidence_npy = _output("confidence_npy")
    depth_exr = _output("depth_exr")
    depth_mm_png = _output("depth_mm_png")
    scene_ply = _output("scene_ply")
    scene_glb = _output("scene_glb")
    colmap = _output("colmap")
    gaussians_ply = _output("gaussians_ply")

    @property
    def scene(self) -> dict[str, Any] | None:
        """The response's scene summary (points, what each filter removed), or None."""
        return self.raw.get("scene")

    @property
    def gaussians(self) -> dict[str, Any] | None:
        """The response's summary of `gaussians_ply` (the scene summary's fields, counted in
        Gaussians), or None."""
        return self.raw.get("gaussians")

    def preview_image(self) -> Image.Image | None:
        return None if self.preview is None else Image.open(io.BytesIO(self.preview))

    def save_all(self, folder: str | Path, stem: str = "da3") -> list[Path]:
        """Write every inline output into `folder` under fixed names (VIEW_FILES and SCENE_FILES
        suffixes after `stem`), and `<stem>.json`, the response without its base64 payloads.
        Outputs the server returned only as a path or URL are not written (the JSON names
        them; `Client.download_outputs` fetches URLs, signed links included, first). Returns
        the paths written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, bytes] = {}
        views = self.views or [self]
        for index, view in enumerate(views):
            if view.depth_png is not None:
                files[output_file_name(stem, "depth", index, len(views))] = view.depth_png
            for output, data in view.outputs.items():
                if output in VIEW_FILES:
                    files[output_file_name(stem, output, index, len(views))] = data
        for output in SCENE_FILES:
            if output in self.outputs:
                files[output_file_name(stem, output, None, len(views))] = self.outputs[output]
        files[f"{stem}.json"] = json.dumps(without_base64(self.raw), indent=2).encode()
        written = []
        for file_name, data in files.items():
            (folder / file_name).write_bytes(data)
            written.append(folder / file_name)
        return written


class SequenceResult:
    """A sequence's response: `sequence` (frames, timestamps, per-chunk alignment), `outputs`
    (each inline file's bytes: `trajectory` and `depth_frames` zips, `depth_video` .mkv),
    `raw` (the response)."""

    def __init__(self, response: dict[str, Any]):
        self.raw = response
        self.sequence: dict[str, Any] = response.get("sequence") or {}
        self.outputs: dict[str, bytes] = {
            name: base64.b64decode(entry["base64"])
            for name, entry in response.items()
            if isinstance(entry, dict) and isinstance(entry.get("base64"), str)
        }

    def trajectory(self) -> np.ndarray | None:
        """(N, 8) rows `timestamp tx ty tz qx qy qz qw` (camera-to-world), from the TUM file."""
        if "trajectory" not in self.outputs:
            return None
        with zipfile.ZipFile(io.BytesIO(self.outputs["trajectory"])) as archive:
            text = archive.read("trajectory.tum").decode()
        rows = [line.split() for line in text.splitlines() if not line.startswith("#")]
        return np.array(rows, dtype=np.float64).reshape(-1, 8)

    def save_all(self, folder: str | Path, stem: str = "video") -> list[Path]:
        """Write each inline file, named by `SEQUENCE_FILES` (`<stem>.trajectory.zip`,
        `<stem>.depth_video.mkv`, `<stem>.scene.ply`, ...), and `<stem>.json` (the response
        without base64)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in self.outputs.items():
            path = folder / f"{stem}.{SEQUENCE_FILES[name]}"
            path.write_bytes(data)
            written.append(path)
        path = folder / f"{stem}.json"
        path.write_text(json.dumps(without_base64(self.raw), indent=2))
        return [*written, path]


def output_file_name(stem: str, output: str, view: int | None, view_count: int) -> str:
    """The fixed file name of an output (never one the server chose): `<stem>.<suffix>` for
    one view's outputs and the scene's (`view` None), `<stem>.view<i>.<suffix>` for view i of
    several. `save_all` and `da3-serverless predict --out` both name files so."""
    if view is None:
        return f"{stem}.{SCENE_FILES[output]}"
    name = stem if view_count == 1 else f"{stem}.view{view}"
    return f"{name}.{VIEW_FILES[output]}"


def without_base64(value: Any) -> Any:
    """The response with every inline payload replaced by its size, for the metadata file."""
    if isinstance(value, dict):
        return {
            k: (f"<{len(v)} base64 chars>" if k in ("base64", "image_base64") and v else
                without_base64(v))
            for k, v in value.items()
        }  # fmt: skip
    if isinstance(value, list):
        return [without_base64(v) for v in value]
    return value


def parse_response(response: dict[str, Any]) -> DepthResult:
    """A v1 response dict -> DepthResult (with `views` when there are several)."""
    result = _parse_view(response, response)
    for view in response.get("views") or []:
        result.views.append(_parse_view(view, response))
    return result


def _parse_view(view: dict[str, Any], top: dict[str, Any]) -> DepthResult:
    outputs = {}
    for name, entry in view.items():
        if isinstance(entry, dict) and isinstance(entry.get("base64"), str):
            outputs[name] = base64.b64decode(entry["base64"])
    png = base64.b64decode(view["image_base64"]) if view.get("image_base64") else None
    if "depth_npy" in outputs:
        depth = np.load(io.BytesIO(outputs["depth_npy"]), allow_pickle=False).astype(np.float32)
    elif png is not None:
        depth = decode_depth_png16(png, view["min_depth"], view["max_depth"])
    else:
        depth = None

    def matrix(name: str) -> np.ndarray | None:
        value = view.get(name)
        return None if value is None else np.asarray(value, dtype=np.float64)

    return DepthResult(
        depth=depth, width=view["width"], height=view["height"],
        min_depth=view["min_depth"], max_depth=view["max_depth"],
        intrinsics=matrix("intrinsics"), extrinsics=matrix("extrinsics"), depth_png=png,
        outputs=outputs, raw=view, is_metric=top.get("is_metric", False),
        units=top.get("units", "relative"), model_id=top.get("model_id", ""),
    )  # fmt: skip


def image_fields(image: ImageInput) -> dict[str, str]:
    """`{"url": ...}` for an http(s) URL, else `{"base64": ...}` of the file/bytes/PIL image."""
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return {"url": image}
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    elif isinstance(image, bytes):
        data = image
    else:
        data = Path(image).read_bytes()
    return {"base64": base64.b64encode(data).decode("ascii")}


class Client:
    """A synchronous client. `api_key` is this service's key (sent in the body, the one place
    every deployment passes on); `runpod_api_key` authenticates to RunPod itself (Bearer).
    `max_body_bytes`: bodies over it are refused before they are sent (RunPod's /runsync
    takes at most 20 MB; a self-hosted server's MAX_BODY_BYTES may be higher).
    `transport` replaces httpx's network transport (tests, proxies)."""

    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        runpod_api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 4,
        poll_interval: float = 1.0,
        transport: httpx.BaseTransport | None = None,
        max_body_bytes: int = RUNSYNC_MAX_BODY_BYTES,
    ):
        self.endpoint = endpoint.rstrip("/")
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.poll_interval = poll_interval
        headers = {"Authorization": f"Bearer {runpod_api_key}"} if runpod_api_key else {}
        if api_key:  # the body carries it for jobs; a self-hosted /status wants it as a header
            headers["X-API-Key"] = api_key
        self._http = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def depth(
        self,
        image: ImageInput | Sequence[ImageInput],
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        **options: Any,
    ) -> DepthResult:
        """Depth for one image (path, URL, bytes, PIL) or a list of views of one scene.

        `options` are v1 request fields: model_id, process_res, outputs, output_metric,
        use_ray_pose, focal_length_px, intrinsics, extrinsics, return_base64, and the scene
        options conf_percentile, max_points, keep_sky, remove_edges, colmap_text,
        colmap_images, gaussians_compact.
        `on_progress(progress)` is called with the job's progress while it runs (see `run`)."""
        if isinstance(image, (list, tuple)):
            payload: dict[str, Any] = {"images": [image_fields(i) for i in image]}
        else:
            source = image_fields(image)
            key = "image_url" if "url" in source else "image_base64"
            payload = {key: next(iter(source.values()))}
        return parse_response(self.run({**payload, **options}, on_progress=on_progress))

    def video(
        self,
        video: str | Path | bytes,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        **options: Any,
    ) -> SequenceResult:
        """A video (file path, http(s) URL or bytes) as a sequence: depth for every sampled
        frame, one trajectory (README "Sequences"). `options` are v1 request fields: fps,
        max_frames, start_s, end_s, chunk_size, overlap, outputs (default trajectory and
        depth_frames), model_id, process_res, output_metric, intrinsics, return_base64.
        `on_progress(summary)` gets each chunk's summary while the job runs."""
        return self._sequence("video", video, on_progress, options)

    def frames_zip(
        self,
        frames: str | Path | bytes,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        **options: Any,
    ) -> SequenceResult:
        """A zip of frames (file path, http(s) URL or bytes) as a sequence: its images in
        natural name order (README "Sequences"). `options` as for `video`; with `fps`, frame
        i's timestamp is i / fps."""
        return self._sequence("frames_zip", frames, on_progress, options)

    def _sequence(
        self,
        kind: str,
        source: str | Path | bytes,
        on_progress: Callable[[dict[str, Any]], None] | None,
        options: dict[str, Any],
    ) -> SequenceResult:
        """One sequence request: `<kind>_url` for an http(s) URL, else `<kind>_base64`."""
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            payload: dict[str, Any] = {f"{kind}_url": source}
        else:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            payload = {f"{kind}_base64": base64.b64encode(data).decode("ascii")}
        options.setdefault("outputs", ["trajectory", "depth_frames"])
        return SequenceResult(self.run({**payload, **options}, on_progress=on_progress))

    def map(
        self,
        source: str | Path | Iterable[BatchItem],
        out: str | Path,
        *,
        concurrency: int = 4,
        retries: int = 3,
        progress: bool = False,
        stop: threading.Event | None = None,
        **options: Any,
    ) -> BatchReport:
        """Send a dataset (a folder of photos, a folder of scene folders, a .jsonl manifest, or
        `BatchItem`s) with at most `concurrency` requests in flight, each item's files written
        to `out/<name>/`; items already there are skipped, so a rerun sends only what is
        missing. `options` are request fields for every item. See `da3_serverless.batch`."""
        from da3_serverless.batch import run_batch

        return run_batch(self, source, out, options=options, concurrency=concurrency,
                         retries=retries, progress=progress, stop=stop)  # fmt: skip

    def download_outputs(self, result: DepthResult) -> list[str]:
        """Fetch the outputs the server returned only by URL (a bucket's, or the self-hosted
        server's signed download link) into `result.outputs` (and each view's; a view's depth
        PNG from its `file_url` into `depth_png` and `depth`); returns the names of those that
        remain without bytes (paths with no URL, failed downloads)."""
        missing: list[str] = []
        fetched: dict[str, bytes | None] = {}  # by URL: view 0 is repeated at the top level
        for target in [result, *result.views]:
            if target.depth_png is None and target.raw.get("file_path") is not None:
                data = self._fetch(target.raw.get("file_url"), fetched)
                if data is None:
                    missing.append("depth")
                else:
                    target.depth_png = data
                    if target.depth is None:
                        target.depth = decode_depth_png16(data, target.min_depth, target.max_depth)
            for name, entry in target.raw.items():
                if not isinstance(entry, dict) or "media_type" not in entry:
                    continue
                if name in target.outputs:
                    continue
                data = self._fetch(entry.get("url"), fetched)
                if data is None:
                    missing.append(name)
                else:
                    target.outputs[name] = data
        return sorted(set(missing))

    def _fetch(self, url: object, fetched: dict[str, bytes | None]) -> bytes | None:
        """The bytes at an http(s) `url` (None when there is none or it fails), fetched once."""
        if not (isinstance(url, str) and url.startswith(("https://", "http://"))):
            return None
        if url not in fetched:
            try:
                # Without this client's headers: a bucket must not see the keys, and a signed
                # link needs none.
                response = httpx.get(url, timeout=self.timeout)
                response.raise_for_status()
                fetched[url] = response.content
            except httpx.HTTPError:
                fetched[url] = None
        return fetched[url]

    def models(self) -> list[dict[str, Any]]:
        """The model table (self-hosted server only: `GET /models`)."""
        return self._send("GET", "models").json()

    def run(
        self,
        payload: dict[str, Any],
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Send one v1 request object; return the v1 response dict or raise DA3Error.

        On RunPod's paths (`.../v2/<id>`) the job carries RunPod's `policy` from this client's
        `timeout` (`executionTimeout` and `ttl`), so it never runs on after the client stops
        waiting; when the deadline passes the job is cancelled. While the job runs,
        `on_progress` gets each new progress object it reports (`{"stage", "percent",
        "message"}`, polled at `/status` after a 1 s `/runsync` wait), never its result."""
        if self.api_key is not None and "api_key" not in payload:
            payload = {**payload, "api_key": self.api_key}
        deadline = time.monotonic() + self.timeout
        envelope: dict[str, Any] = {"input": payload}
        path = "runsync"
        if "/v2/" in urlsplit(self.endpoint).path + "/":
            envelope["policy"] = deadline_policy(self.timeout)
            # Answered before the deadline, done or not, so the client can still cancel it;
            # within RunPod's least wait (1 s) when the caller follows the job's progress.
            wait = 1000 if on_progress else math.floor(self.timeout * 1000) - 2000
            path += f"?wait={min(max(wait, 1000), 90_000)}"
        body = json.dumps(envelope).encode()
        check_body_size(body, self.max_body_bytes, "runsync")
        job = _job(self._send("POST", path, content=body, headers=JSON_HEADERS))
        seen = None
        while job.get("status") in PENDING:
            seen = _report_progress(job, seen, on_progress)
            if time.monotonic() > deadline:
                self._cancel(job.get("id"))
                raise DA3Error(
                    "timeout", None,
                    f"job {job.get('id')} unfinished after {self.timeout} s: cancelled it",
                )  # fmt: skip
            time.sleep(self.poll_interval)
            job = _job(self._send("GET", f"status/{job['id']}"))
        if job.get("status") == "COMPLETED" and isinstance(job.get("output"), dict):
            output = job["output"]
            if "error" in output:  # a handler that returned an error object as its output
                raise _error(output["error"], None)
            return output
        if "error" in job:
            raise _error(job["error"], job.get("_http_status"))
        if job.get("status") == "CANCELLED":
            raise DA3Error("cancelled", 499, f"job {job.get('id')} was cancelled")
        raise DA3Error("runpod_failed", None, f"job ended {job.get('status')!r} without output")

    def _cancel(self, job_id: object) -> None:
        """Cancel a job this client stopped waiting for (so it stops running and billing);
        a failure to cancel is not the caller's error (the job's policy still ends it)."""
        if not isinstance(job_id, str):
            return
        with contextlib.suppress(httpx.HTTPError):
            self._http.post(f"{self.endpoint}/cancel/{job_id}", timeout=10.0)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, retried with backoff on 429 and on transient 503s (at most `max_retries`
        times): `overloaded`, `out_of_memory`, or a 503 without our error body (a proxy's)."""
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, f"{self.endpoint}/{path}", **kwargs)
            except httpx.TimeoutException as exc:
                raise DA3Error("timeout", None, f"{method} {path}: {exc}") from None
            except httpx.TransportError as exc:
                raise DA3Error("connection_failed", None, f"{method} {path}: {exc}") from None
            if not _retryable(response) or attempt == self.max_retries:
                return response
            time.sleep(_backoff(response, attempt))
        raise AssertionError("unreachable")


JSON_HEADERS = {"Content-Type": "application/json"}


def deadline_policy(timeout_s: float) -> dict[str, int]:
    """RunPod's `policy` for a client that waits `timeout_s`: the job may neither run
    (`executionTimeout`, at least 5 s) nor live (`ttl`, at least 10 s) longer than that."""
    milliseconds = math.ceil(timeout_s * 1000)
    return {
        "executionTimeout": min(max(milliseconds, 5_000), MAX_POLICY_MS),
        "ttl": min(max(milliseconds, 10_000), MAX_POLICY_MS),
    }


def _report_progress(
    job: dict[str, Any], seen: object, on_progress: Callable[[dict[str, Any]], None] | None
) -> object:
    """Pass an IN_PROGRESS job's progress object (RunPod shows it as `output` while the job
    runs) to `on_progress` when it changed; returns the latest seen."""
    progress = job.get("output")
    if job.get("status") != "IN_PROGRESS" or not isinstance(progress, dict):
        return seen
    if on_progress is not None and progress != seen and "stage" in progress:
        on_progress(progress)
    return progress


def check_body_size(body: bytes, limit: int, path: str) -> None:
    """Refuse (DA3Error `request_too_large`, 413) a body RunPod would refuse, before sending it."""
    if len(body) > limit:
        raise DA3Error(
            "request_too_large",
            413,
            f"the request is {len(body)} bytes, over the {limit} bytes /{path} takes (RunPod: "
            f"{RUN_MAX_BODY_BYTES // 1_000_000} MB on /run, {RUNSYNC_MAX_BODY_BYTES // 1_000_000}"
            " MB on /runsync): pass large images by image_url (or images[].url) instead of "
            "base64, or send fewer views per request",
        )


def _job(response: httpx.Response) -> dict[str, Any]:
    """The RunPod-style job object of a response; a bare v1 error body becomes a FAILED job."""
    try:
        body = response.json()
    except ValueError:
        raise DA3Error("http_error", response.status_code, response.text[:300]) from None
    if not isinstance(body, dict):
        raise DA3Error("http_error", response.status_code, f"unexpected body: {body!r:.300}")
    if "status" not in body or isinstance(body.get("status"), int):
        if "error" not in body:
            raise DA3Error("http_error", response.status_code, f"unexpected body: {body!r:.300}")
        body = {"status": "FAILED", "error": body["error"]}
    body["_http_status"] = response.status_code
    return body


def _error(error: object, http_status: int | None) -> DA3Error:
    """DA3Error from our error object: a dict, or its JSON text (RunPod's string `error`)."""
    if isinstance(error, str):
        try:
            error = json.loads(error)
        except ValueError:
            return DA3Error("runpod_failed", http_status, error[:500])
    if isinstance(error, dict) and "code" in error:
        status = error.get("status", http_status)
        return DA3Error(str(error["code"]), status, str(error.get("message", "")))
    return DA3Error("runpod_failed", http_status, repr(error)[:500])


def _retryable(response: httpx.Response) -> bool:
    if response.status_code == 429:
        return True
    failure = _failure(response)
    if failure is None:
        return response.status_code == 503
    return failure.code in TRANSIENT_CODES


def _failure(response: httpx.Response) -> DA3Error | None:
    """Our error in a response: a bare v1 error body, or a FAILED job (RunPod's APIs answer
    failures with 200 and the error as JSON text). None when the body holds neither."""
    try:
        body = response.json()
        if body.get("status") == "FAILED" or isinstance(body.get("status"), int):
            error = _error(body["error"], response.status_code)
            return error if error.code != "runpod_failed" else None
    except (ValueError, KeyError, AttributeError, TypeError):
        pass
    return None


def _backoff(response: httpx.Response, attempt: int) -> float:
    retry_after = response.headers.get("retry-after", "")
    if retry_after.isdigit():
        return min(float(retry_after), 30.0)
    return min(0.5 * 2**attempt, 30.0)
