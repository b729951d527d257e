"""API contract v1: the request and response objects (docs/ARCHITECTURE.md §4).

`parse_request(payload)` turns the JSON object a client sent (the `input` of a RunPod job, the
body of `POST /runsync`) into a `RunRequest`, or raises `ServiceError("invalid_input")` whose
message names every offending field and says how to fix it. The response models describe what
the service returns; the service builds plain dicts, the models exist for validation and for the
HTTP server's OpenAPI document.
"""

from __future__ import annotations

import difflib
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from da3_serverless.api.anchors import Anchors
from da3_serverless.api.errors import ServiceError
from da3_serverless.config import Settings
from da3_serverless.exports.points import DEFAULT_CONF_PERCENTILE, DEFAULT_MAX_POINTS

SCHEMA_VERSION = "1"
OutputName = Literal[
    "depth", "preview", "confidence", "sky_mask", "depth_npy", "pointcloud", "confidence_npy",
    "depth_exr", "depth_mm_png", "scene_ply", "scene_glb", "colmap", "gaussians_ply",
]  # fmt: skip
OUTPUT_NAMES: tuple[str, ...] = OutputName.__args__
# Outputs of a sequence (a video, or `images` with `sequence`): the only ones it gives.
SequenceOutputName = Literal["trajectory", "depth_frames", "depth_video", "preview_video"]
SEQUENCE_OUTPUTS: tuple[str, ...] = SequenceOutputName.__args__
AnyOutputName = Literal[OutputName, SequenceOutputName]
# Left out, a sequence's `outputs` (the client's and the CLI's default too): `depth` is no
# output of a sequence.
SEQUENCE_DEFAULT_OUTPUTS: tuple[str, ...] = ("trajectory", "depth_frames")
# Outputs of the whole scene: at the top level of the response only, never per view. The fused
# point cloud's files (any model with a camera), and the 3D Gaussians (models with the head).
SCENE_OUTPUTS: tuple[str, ...] = ("scene_ply", "scene_glb", "colmap")
GAUSSIAN_OUTPUT = "gaussians_ply"
TOP_LEVEL_OUTPUTS: tuple[str, ...] = (*SCENE_OUTPUTS, GAUSSIAN_OUTPUT)
MIN_PROCESS_RES = 14  # one ViT patch
MAX_REPORTED_PROBLEMS = 10
MAX_URL_CHARS = 8192
MAX_MODEL_ID_CHARS = 256
MAX_MATRIX_SIDE = 4
Matrix = list[list[FiniteFloat]]


def _is_matrix(value: object) -> bool:
    """A list of lists of non-lists: one matrix, as opposed to a list of matrices."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(row, list) for row in value)
        and not any(isinstance(x, list) for row in value for x in row)
    )


def _check_shape(matrix: Matrix, shapes: tuple[tuple[int, int], ...], what: str) -> None:
    rows = len(matrix)
    cols = {len(row) for row in matrix}
    if len(cols) != 1 or (rows, cols.pop()) not in shapes:
        wanted = " or ".join(f"{r}x{c}" for r, c in shapes)
        raise ValueError(f"each {what} matrix must be {wanted} (a list of rows of numbers)")


# Strict: a JSON "yes" or 1 is not a boolean, "504" is not an integer, strings are not numbers.
_STRICT = ConfigDict(extra="forbid", strict=True)


def _integral(value: object) -> object:
    """A whole JSON number written with a fraction (56.0) as the integer it is: JSON Schema's
    `integer` admits it. Anything else is left for strict validation (56.5 and "56" fail)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer field: strict, but a whole number written as 56.0 counts.
WholeNumber = Annotated[int, BeforeValidator(_integral)]


# The request's sources: exactly one is given. A video or a zip of frames is a sequence.
STREAMS = ("video_url", "video_base64", "frames_zip_url", "frames_zip_base64")
SOURCES = ("image_url", "image_base64", "images", *STREAMS)


class ImageRef(BaseModel):
    """One view of the scene: exactly one of `url` (http/https) or `base64` (raw or data URI)."""

    model_config = _STRICT

    url: str | None = None
    base64: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageRef:
        if (self.url is None) == (self.base64 is None):
            raise ValueError("give exactly one of 'url' or 'base64' for each entry of images")
        return self


class RunRequest(BaseModel):
    """A v1 request. `process_res` is only checked against its lower bound here; the upper bound
    (`settings.max_process_res`) and the number of views (`settings.max_views`) are server
    settings, checked by `check_limits` (which `parse_request(payload, settings)` calls)."""

    model_config = _STRICT

    api_key: str | None = None
    image_url: str | None = None
    image_base64: str | None = None
    images: list[ImageRef] | None = Field(default=None, min_length=1)
    # A sequence (docs/ARCHITECTURE.md §8): a video, a zip of frames, or `images` in order
    # with `sequence`.
    video_url: str | None = None
    video_base64: str | None = None
    frames_zip_url: str | None = None
    frames_zip_base64: str | None = None
    sequence: bool = False
    fps: FiniteFloat | None = Field(default=None, gt=0, le=240)
    # Whole numbers with the bound before the validator, so the JSON schema says `minimum`.
    max_frames: Annotated[int, Field(ge=1), BeforeValidator(_integral)] | None = None
    start_s: FiniteFloat = Field(default=0.0, ge=0)
    end_s: FiniteFloat | None = Field(default=None, gt=0)
    chunk_size: Annotated[int, Field(ge=2), BeforeValidator(_integral)] | None = None
    overlap: Annotated[int, Field(ge=1), BeforeValidator(_integral)] | None = None
    model_id: str | None = None
    output_metric: bool = True
    use_ray_pose: bool = False
    process_res: WholeNumber = Field(default=504, ge=MIN_PROCESS_RES)
    # One number for every view, or a list with one per view; pixels of the input image.
    focal_length_px: FiniteFloat | list[FiniteFloat] | None = None
    # One 3x3 per view, or one 3x3 (bare or in a list) for every view; pixel units.
    intrinsics: list[Matrix] | None = None
    # One world-to-camera 3x4 (or 4x4 with last row 0 0 0 1) per view; stored as 3x4.
    extrinsics: list[Matrix] | None = None
    # At most one entry per output name (the payload check says so first, before parsing).
    outputs: list[AnyOutputName] = Field(
        default_factory=lambda: ["depth"], min_length=1, max_length=len(OUTPUT_NAMES)
    )
    return_base64: bool = True
    # Scene outputs (scene_ply, scene_glb, colmap, gaussians_ply); ignored without them.
    conf_percentile: FiniteFloat = Field(default=DEFAULT_CONF_PERCENTILE, ge=0, le=100)
    max_points: WholeNumber = Field(default=DEFAULT_MAX_POINTS, ge=1)
    keep_sky: bool = False
    remove_edges: bool = True
    colmap_text: bool = False
    colmap_images: Literal["png", "jpg"] = "png"
    gaussians_compact: bool = False
    # Known depths or distances that fix the answer's scale (api/anchors.py).
    anchors: Anchors | None = None

    @field_validator("focal_length_px", mode="before")
    @classmethod
    def _check_focal_lengths(cls, value: object) -> object:
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        if not values:
            _refuse_focal("is an empty list: give one number, or one per view")
        for focal in values:
            if isinstance(focal, bool) or not isinstance(focal, int | float):
                _refuse_focal("must be a number, or a list with one number per view")
            if not (math.isfinite(focal) and focal > 0):
                _refuse_focal("must be a finite number greater than 0")
        return value

    @field_validator("intrinsics", "extrinsics", mode="before")
    @classmethod
    def _wrap_single_matrix(cls, value: object) -> object:
        return [value] if _is_matrix(value) else value

    @field_validator("intrinsics")
    @classmethod
    def _check_intrinsics(cls, value: list[Matrix] | None) -> list[Matrix] | None:
        for k in value or []:
            _check_shape(k, ((3, 3),), "intrinsics")
            if not (k[0][0] > 0 and k[1][1] > 0):
                raise ValueError(
                    "intrinsics need positive focal lengths fx = K[0][0], fy = K[1][1]"
                )
            if any(abs(a - b) > 1e-6 for a, b in zip(k[2], (0.0, 0.0, 1.0), strict=True)):
                raise ValueError(
                    "the last row of each intrinsics matrix must be [0, 0, 1] "
                    "(is the matrix transposed?)"
                )
        return value

    @field_validator("extrinsics")
    @classmethod
    def _check_extrinsics(cls, value: list[Matrix] | None) -> list[Matrix] | None:
        if value is None:
            return None
        out = []
        for e in value:
            _check_shape(e, ((3, 4), (4, 4)), "extrinsics")
            if len(e) == 4:
                if any(abs(a - b) > 1e-6 for a, b in zip(e[3], (0.0, 0.0, 0.0, 1.0), strict=True)):
                    raise ValueError("the last row of a 4x4 extrinsics matrix must be [0, 0, 0, 1]")
                e = e[:3]
            out.append(e)
        return out

    @field_validator("outputs")
    @classmethod
    def _dedupe(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _one_source_and_camera_per_view(self) -> RunRequest:
        given = [name for name in SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(SOURCES)} "
                f"(got {', '.join(given) if given else 'none'})"
            )
        if self.is_sequence:
            if "outputs" not in self.model_fields_set:
                self.outputs = list(SEQUENCE_DEFAULT_OUTPUTS)
            _check_sequence(self)
            return self
        wrong = [name for name in self.outputs if name in SEQUENCE_OUTPUTS]
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)} are outputs of a sequence: send video_url, video_base64, "
                'frames_zip_url, frames_zip_base64 or images with "sequence": true'
            )
        n = self.view_count
        if isinstance(self.focal_length_px, list):
            self.focal_length_px = _one_or_per_view(self.focal_length_px, n)
        if self.intrinsics is not None and len(self.intrinsics) == 1:
            self.intrinsics = self.intrinsics * n  # one camera for every view
        for name in ("intrinsics", "extrinsics"):
            matrices = getattr(self, name)
            if matrices is not None and len(matrices) != n:
                raise ValueError(
                    f"{name} has {len(matrices)} matrices but the request has {n} view(s): "
                    "give one per image, in the order of the images"
                    + (", or one intrinsics matrix for every view" if name == "intrinsics" else "")
                )
        return self

    @property
    def view_count(self) -> int:
        return len(self.images) if self.images is not None else 1

    @property
    def has_stream(self) -> bool:
        """Whether the source is a video or a zip of frames (a sequence by itself)."""
        return any(getattr(self, name) is not None for name in STREAMS)

    @property
    def is_sequence(self) -> bool:
        """A video, a zip of frames, or images to run as a sequence (in chunks, past
        `MAX_VIEWS`)."""
        return self.sequence or self.has_stream


def _check_sequence(request: RunRequest) -> None:
    """What a sequence may ask: its own outputs, one intrinsics for all frames (or, for
    images, one per image), no given poses, and `sequence` only with `images`."""
    if request.sequence and not request.has_stream and request.images is None:
        raise ValueError(
            '"sequence": true goes with images (a video or a frames zip is a sequence already)'
        )
    allowed = (*SEQUENCE_OUTPUTS, *TOP_LEVEL_OUTPUTS)
    wrong = [name for name in request.outputs if name not in allowed]
    if wrong:
        raise ValueError(
            f"a sequence gives {', '.join(allowed)}; {', '.join(wrong)} cannot be asked for "
            "one: remove them"
        )
    if request.extrinsics is not None or request.anchors is not None:
        raise ValueError("a sequence cannot be given extrinsics or anchors: leave them out")
    if isinstance(request.focal_length_px, list):
        if len(request.focal_length_px) != 1:
            raise ValueError("a sequence takes one focal_length_px for all frames")
        request.focal_length_px = request.focal_length_px[0]
    counts = (1,) if request.has_stream else (1, request.view_count)
    if request.intrinsics is not None and len(request.intrinsics) not in counts:
        raise ValueError("give one 3x3 intrinsics for all frames, or one per image")
    chunking = (request.chunk_size, request.overlap)
    if None not in chunking and chunking[1] >= chunking[0]:
        raise ValueError("overlap must be less than chunk_size")
    if request.end_s is not None and request.end_s <= request.start_s:
        raise ValueError("end_s must be after start_s")


def _refuse_focal(rule: str) -> None:
    raise ValueError(f"{rule} (the focal length in pixels of the input image)")


def _one_or_per_view(focals: list[float], views: int) -> float | list[float]:
    """`focal_length_px` as a list: one entry stands for every view, else one per view."""
    if len(focals) == 1:
        return focals[0]
    if len(focals) != views:
        raise ValueError(
            f"focal_length_px has {len(focals)} numbers but the request has {views} view(s): "
            "give one number for every view, or one per image in the order of the images"
        )
    return focals


def check_limits(request: RunRequest, settings: Settings) -> None:
    """Refuse a request past the server's limits: `process_res` above `settings.max_process_res`,
    `max_points` above `settings.max_points` or more views than `settings.max_views`
    (`ServiceError("invalid_input")`). Left out, `process_res` is the native 504 capped at
    the server's limit (the default the OpenAPI document publishes)."""
    if "process_res" not in request.model_fields_set:
        request.process_res = min(request.process_res, settings.max_process_res)
    problems = []
    if request.process_res > settings.max_process_res:
        problems.append(
            f"process_res {request.process_res} is above this server's limit of "
            f"{settings.max_process_res}: use a value from {MIN_PROCESS_RES} to "
            f"{settings.max_process_res} (504 is the model's native resolution)"
        )
    if request.max_points > settings.max_points:
        problems.append(
            f"max_points {request.max_points} is above this server's limit of "
            f"{settings.max_points}: ask for at most {settings.max_points} points"
        )
    if request.is_sequence and request.view_count > settings.max_video_frames:
        problems.append(
            f"images has {request.view_count} frames but this server takes at most "
            f"{settings.max_video_frames} in a sequence (MAX_VIDEO_FRAMES): send fewer"
        )
    if request.max_frames is not None and request.max_frames > settings.max_video_frames:
        problems.append(
            f"max_frames {request.max_frames} is above this server's limit of "
            f"{settings.max_video_frames} (MAX_VIDEO_FRAMES)"
        )
    if not request.is_sequence and request.view_count > settings.max_views:
        problems.append(
            f"images has {request.view_count} views but this server accepts at most "
            f"{settings.max_views}: send fewer views per request (or "
            '"sequence": true for more)'
        )
    if problems:
        raise ServiceError("invalid_input", "; ".join(problems))


_FIELDS = tuple(RunRequest.model_fields)
_IMAGE_REF_FIELDS = tuple(ImageRef.model_fields)
_TYPE_HINTS = {
    "bool_type": "must be true or false (a JSON boolean)",
    "int_type": "must be a whole number (a JSON integer)",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "model_type": "must be an object",
    "finite_number": "must be a finite number",
}


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        part = part if isinstance(part, int) else str(part)[:64]
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: Any) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    where = _where(loc)
    if kind == "extra_forbidden":
        name = str(loc[-1])[:64]
        valid = _IMAGE_REF_FIELDS if len(loc) > 1 else _FIELDS
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        where = where if len(loc) > 1 else f"'{name}'"
        return f"unknown field {where}{hint}: remove it; valid fields are {', '.join(valid)}"
    if kind == "literal_error" and loc and loc[0] == "outputs":
        return f"{where} must be one of {', '.join(OUTPUT_NAMES + SEQUENCE_OUTPUTS)}"
    if kind == "value_error":
        # Our own validators: the message already says what to do.
        message = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
        return f"{where}: {message}" if where else message
    if kind in _TYPE_HINTS:
        return f"{where} {_TYPE_HINTS[kind]}"
    bounds = ("too_short", "greater_than", "greater_than_equal", "less_than_equal")
    if kind in bounds and "ctx" in error:
        # pydantic's own wording, without the offending value (it could be a secret).
        return f"{where}: {error['msg'].lower()}"
    return f"{where}: {error['msg']}" if where else error["msg"]


def parse_request(payload: object, settings: Settings | None = None) -> RunRequest:
    """Validate a v1 request object; with `settings`, also `check_limits`.

    Raises `ServiceError("invalid_input")` naming each bad field (`image_too_large` for base64
    text over `settings.base64_chars_limit`). Sizes are checked first (`check_sizes`), so
    validation costs about the same for every request. Messages never contain the values sent
    (so never the api_key).
    """
    if not isinstance(payload, dict):
        raise ServiceError(
            "invalid_input",
            f"the request must be a JSON object with fields such as image_url, got "
            f"{type(payload).__name__}",
        )
    check_sizes(payload, settings)
    try:
        request = RunRequest.model_validate(payload)
    except ValidationError as exc:
        messages = list(dict.fromkeys(_describe(e) for e in exc.errors(include_url=False)))
        if len(messages) > MAX_REPORTED_PROBLEMS:  # a message never outgrows the request
            extra = len(messages) - MAX_REPORTED_PROBLEMS
            messages = [*messages[:MAX_REPORTED_PROBLEMS], f"and {extra} more problem(s)"]
        raise ServiceError("invalid_input", "invalid request: " + "; ".join(messages)) from None
    if settings is not None:
        check_limits(request, settings)
    return request


_DEFAULTS = Settings.model_construct()  # the defaults, without reading the environment


# long function: one list of cheap checks, each a few lines, read in order.
def check_sizes(payload: dict, settings: Settings | None = None) -> None:
    """Length checks that cost nothing, before pydantic looks at any value: every list has a
    cap (`images` by `max_views`, `outputs` by the number of outputs, camera matrices by their
    shapes), as do the number of fields, URLs, `model_id` and base64 text (by its encoded
    length, before whitespace is stripped or anything is decoded)."""
    limits = settings if settings is not None else _DEFAULTS
    problems = []
    if len(payload) > 2 * len(_FIELDS):
        problems.append(
            f"the request has {len(payload)} fields; valid fields are {', '.join(_FIELDS)}"
        )
    views = payload.get("images")
    views = views if isinstance(views, list) else []
    # A sequence's frames may pass MAX_VIEWS (docs/ARCHITECTURE.md §8).
    most = limits.max_video_frames if payload.get("sequence") is True else limits.max_views
    if len(views) > most:
        problems.append(
            f"images has {len(views)} views but this server accepts at most {most}: send "
            "fewer views per request"
            + ("" if payload.get("sequence") is True else ' (or "sequence": true for more)')
        )
        views = []
    refs = [(f"images[{i}]", ref) for i, ref in enumerate(views) if isinstance(ref, dict)]
    for where, ref in refs:
        if len(ref) > 2 * len(_IMAGE_REF_FIELDS):
            problems.append(f"{where} has {len(ref)} fields: give only 'url' or 'base64'")
    outputs = payload.get("outputs")
    if isinstance(outputs, list) and len(outputs) > len(OUTPUT_NAMES):
        problems.append(
            f"outputs has {len(outputs)} entries but there are {len(OUTPUT_NAMES)} outputs "
            f"({', '.join(OUTPUT_NAMES)}): name each at most once"
        )
    if _oversized(payload.get("focal_length_px"), (most,)):
        problems.append(
            f"focal_length_px must be one number, or a list of one per view (at most "
            f"{most} numbers)"
        )
    outer = max(most, MAX_MATRIX_SIDE)
    for name in ("intrinsics", "extrinsics"):
        if _oversized(payload.get(name), (outer, MAX_MATRIX_SIDE, MAX_MATRIX_SIDE)):
            problems.append(
                f"{name} must be one matrix per view (at most {most}), each a list "
                f"of at most {MAX_MATRIX_SIDE} rows of at most {MAX_MATRIX_SIDE} numbers"
            )
    urls = ("image_url", "video_url", "frames_zip_url")
    texts = [(name, payload.get(name), MAX_URL_CHARS) for name in urls]
    texts += [(f"{where}.url", ref.get("url"), MAX_URL_CHARS) for where, ref in refs]
    texts.append(("model_id", payload.get("model_id"), MAX_MODEL_ID_CHARS))
    for where, text, cap in texts:
        if isinstance(text, str) and len(text) > cap:
            problems.append(f"{where} is {len(text)} characters long; at most {cap} are accepted")
    if problems:
        raise ServiceError("invalid_input", "invalid request: " + "; ".join(problems))
    _check_base64_lengths(payload, refs, limits.base64_chars_limit)
    video_limit = -(-limits.max_video_bytes // 3) * 4 * 103 // 100 + 1024
    for kind, advice in (("video", "cut the video"), ("frames_zip", "send fewer frames")):
        text = payload.get(f"{kind}_base64")
        if isinstance(text, str) and len(text) > video_limit:
            raise ServiceError(
                "request_too_large",
                f"{kind}_base64 is {len(text)} characters; this server accepts the base64 of "
                f"at most {limits.max_video_bytes} bytes (MAX_VIDEO_BYTES): {advice}, or send "
                f"it by {kind}_url",
            )


def _oversized(value: object, caps: tuple[int, ...]) -> bool:
    """Whether nested lists are longer, at some level, than that level's cap (or nest deeper
    than there are caps). Visits at most the product of the caps."""
    if not isinstance(value, list):
        return False
    if not caps or len(value) > caps[0]:
        return True
    return any(_oversized(item, caps[1:]) for item in value)


def _check_base64_lengths(payload: dict, refs: list[tuple[str, dict]], limit: int) -> None:
    texts = [("image_base64", payload.get("image_base64"))]
    texts += [(f"{where}.base64", ref.get("base64")) for where, ref in refs]
    for where, text in texts:
        if isinstance(text, str) and len(text) > limit:
            raise ServiceError(
                "image_too_large",
                f"{where} is {len(text)} characters of base64; this server accepts at most "
                f"{limit} (MAX_BASE64_CHARS): send a smaller (e.g. resized or JPEG-compressed) "
                "image, or pass it by image_url",
            )


# ---- response ----------------------------------------------------------------------------


class OutputFile(BaseModel):
    """One extra output (preview, confidence, ...): inline base64, a file on the volume, and/or
    a bucket URL, with its media type (e.g. `image/png`, `application/octet-stream`)."""

    base64: str | None = None
    path: str | None = None
    url: str | None = None
    media_type: str


class ViewResult(BaseModel):
    """The result for one view. `image_base64` is the depth map as a 16-bit grayscale PNG:
    depth = min_depth + v * (max_depth - min_depth) / 65535 (`depth_encoding` "png16-linear")."""

    width: int
    height: int
    min_depth: FiniteFloat
    max_depth: FiniteFloat
    image_base64: str | None = None
    depth_encoding: str = "png16-linear"
    file_path: str | None = None
    file_url: str | None = None
    intrinsics: list[list[float]] | None = Field(default=None, description="3x3, pixels")
    extrinsics: list[list[float]] | None = Field(
        default=None, description="3x4 world-to-camera [R|t]"
    )
    preview: OutputFile | None = None
    confidence: OutputFile | None = None
    sky_mask: OutputFile | None = None
    depth_npy: OutputFile | None = None
    pointcloud: OutputFile | None = None
    confidence_npy: OutputFile | None = None
    depth_exr: OutputFile | None = None
    depth_mm_png: OutputFile | None = None
    depth_mm_saturated: int | None = Field(
        default=None, description="pixels of depth_mm_png past 65.535 m, saturated at 65535"
    )


class SceneSummary(BaseModel):
    """What the scene outputs hold: the point count, the points each filter removed (in order:
    invalid, sky, edges, confidence, voxel), the confidence threshold and the voxel size (in
    `units`; null when no thinning was needed)."""

    points: int
    removed: dict[str, int]
    confidence_threshold: float | None = None
    voxel_size: float | None = None


class AnchorFit(BaseModel):
    """How the anchors fixed the scale: `scale` (and `shift` in inverse depth for the
    monocular relative model) applied to depth, cameras and scene; with given extrinsics the
    poses fix the scale (`fitted` false, `suggested_scale` what the anchors alone would give).
    Residuals in metres over the inliers; `rejected` names anchors with outliers, `unusable`
    those on sky or invalid pixels."""

    fitted: bool
    model: Literal["scale", "inverse_depth_scale_shift"]
    scale: float
    shift: float | None = None
    suggested_scale: float | None = None
    observations: int
    inliers: int
    outliers: int
    residual_m: dict[str, float]
    rejected: list[str]
    unusable: list[str]


class RunResponse(ViewResult):
    """A v1 response: the first view's fields at the top level (so the original single-image
    contract keeps its names), `views` with one entry per view when there are several, and the
    scene outputs (top level only)."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    model_id: str
    is_metric: bool
    units: Literal["m", "relative", "pose_units"]
    views: list[ViewResult] | None = None
    scene_ply: OutputFile | None = None
    scene_glb: OutputFile | None = None
    colmap: OutputFile | None = None
    scene: SceneSummary | None = None
    gaussians_ply: OutputFile | None = None
    gaussians: SceneSummary | None = Field(
        default=None,
        description="with gaussians_ply: the same summary, counted in Gaussians (one per cell "
        "of the network's grid per view): `points` is how many the file holds",
    )
    anchors: AnchorFit | None = Field(
        default=None, description="with anchors in the request: the fit applied to the answer"
    )
    scale: dict[str, Any] | None = Field(
        default=None,
        description="where the depth's scale came from: `source` model (with `nested_scale`), "
        "focal_length (`focal_length_px` per view, `focal_from`, `canonical_focal_px`), poses "
        "(`pose_scale`), anchors (`anchors_scale`, `before_anchors`) or none",
    )
    sequence: dict[str, Any] | None = Field(
        default=None,
        description="a sequence's summary: frames, chunk_size, overlap, timestamps, and per "
        "chunk its span, progress and alignment (scale, residual, inliers)",
    )
    trajectory: OutputFile | None = None
    depth_frames: OutputFile | None = None
    depth_video: OutputFile | None = None
    preview_video: OutputFile | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
