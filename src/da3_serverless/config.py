"""The one place that reads the environment.

Everything else receives a `Settings` object (or the values it needs) as an argument.
"""

from __future__ import annotations

import os
import re
import sys
from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

APP_NAME = "da3-serverless"
DEFAULT_MODEL_ID = "depth-anything/DA3NESTED-GIANT-LARGE-1.1"
# DA3_DTYPE: every accepted spelling -> the torch dtype's name.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}  # fmt: skip
DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")
RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
# What a response may carry inline (base64) by default: under RunPod's 20 MB answer cap there,
# more on a self-hosted server (whose stored files are also downloadable by signed link).
RUNPOD_MAX_RESPONSE_BYTES = 15_000_000
SERVER_MAX_RESPONSE_BYTES = 50_000_000


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Service settings, read from environment variables (names in the Field aliases)."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore")

    # Auth
    # Secrets stay out of reprs, so they never reach logs or test output.
    api_key: str | None = Field(default=None, validation_alias=_env("DA3_API_KEY"), repr=False)
    allow_unauthenticated: bool = Field(
        default=False, validation_alias=_env("DA3_ALLOW_UNAUTHENTICATED")
    )

    # Model
    model_id: str = Field(default=DEFAULT_MODEL_ID, validation_alias=_env("MODEL_ID"))
    device: str | None = Field(default=None, validation_alias=_env("DA3_DEVICE"))
    dtype: str | None = Field(default=None, validation_alias=_env("DA3_DTYPE"))
    compile: bool = Field(default=False, validation_alias=_env("DA3_COMPILE"))
    model_memory_budget_gb: float | None = Field(
        default=None, gt=0, validation_alias=_env("MODEL_MEMORY_BUDGET_GB")
    )
    # What one request may cost (api/budget.py); None: a default for the device, set at start.
    request_budget_tokens: int | None = Field(
        default=None, ge=1, validation_alias=_env("REQUEST_BUDGET_TOKENS")
    )
    request_budget_pixels: int | None = Field(
        default=None, ge=1, validation_alias=_env("REQUEST_BUDGET_PIXELS")
    )
    warmup: bool = Field(default=True, validation_alias=_env("WARMUP"))
    # Written by the worker once its model is loaded and warm (the image's HEALTHCHECK reads it).
    ready_file: Path | None = Field(default=None, validation_alias=_env("DA3_READY_FILE"))
    hf_hub_offline: bool = Field(default=False, validation_alias=_env("HF_HUB_OFFLINE"))
    hf_home: Path | None = Field(default=None, validation_alias=_env("HF_HOME"))
    hf_token: str | None = Field(default=None, validation_alias=_env("HF_TOKEN"), repr=False)

    # Workspace and storage
    workspace: Path | None = Field(default=None, validation_alias=_env("WORKSPACE"))
    # The user's data and cache folders (XDG), the workspace's home without WORKSPACE.
    data_home: Path | None = Field(default=None, validation_alias=_env("XDG_DATA_HOME"))
    cache_home: Path | None = Field(default=None, validation_alias=_env("XDG_CACHE_HOME"))
    # 0.1 to 3650 days (the Hub form's range, .runpod/hub.json, is the same).
    output_retention_days: float = Field(
        default=14, ge=0.1, le=3650, validation_alias=_env("OUTPUT_RETENTION_DAYS")
    )
    # RUNPOD_MAX_RESPONSE_BYTES unless set; `for_server` gives the self-hosted default.
    max_response_bytes: int = Field(
        default=RUNPOD_MAX_RESPONSE_BYTES, ge=0, validation_alias=_env("MAX_RESPONSE_BYTES")
    )
    # Self-hosted: the key that signs download links to stored outputs (derived from
    # DA3_API_KEY when unset; random per process without either), and the server's public base
    # URL for those links (default: the URL the request came to).
    download_secret: str | None = Field(
        default=None, min_length=16, validation_alias=_env("DA3_DOWNLOAD_SECRET"), repr=False
    )
    public_url: str | None = Field(default=None, validation_alias=_env("DA3_PUBLIC_URL"))
    bucket_endpoint_url: str | None = Field(
        default=None, validation_alias=_env("BUCKET_ENDPOINT_URL")
    )
    bucket_access_key_id: str | None = Field(
        default=None, validation_alias=_env("BUCKET_ACCESS_KEY_ID")
    )
    bucket_secret_access_key: str | None = Field(
        default=None, validation_alias=_env("BUCKET_SECRET_ACCESS_KEY"), repr=False
    )

    # Input limits
    max_image_side: int = Field(
        default=4096, ge=1, le=65_535, validation_alias=_env("MAX_IMAGE_SIDE")
    )
    max_download_bytes: int = Field(
        default=50_000_000, ge=1, validation_alias=_env("MAX_DOWNLOAD_BYTES")
    )
    download_timeout_s: float = Field(
        default=20.0, gt=0, validation_alias=_env("DOWNLOAD_TIMEOUT_S")
    )
    max_views: int = Field(default=16, ge=1, validation_alias=_env("MAX_VIEWS"))
    # Videos and long sequences (docs/ARCHITECTURE.md §8): checked from the headers first.
    max_video_bytes: int = Field(
        default=200_000_000, ge=1, validation_alias=_env("MAX_VIDEO_BYTES")
    )
    max_video_duration_s: float = Field(
        default=600.0, gt=0, validation_alias=_env("MAX_VIDEO_DURATION_S")
    )
    max_video_frames: int = Field(default=2000, ge=1, validation_alias=_env("MAX_VIDEO_FRAMES"))
    max_video_pixels: int = Field(
        default=3840 * 2160, ge=1, validation_alias=_env("MAX_VIDEO_PIXELS")
    )
    # At most the predictor's own ceiling (inference.preprocess.MAX_PROCESS_RES = 2016).
    max_process_res: int = Field(
        default=2016, ge=14, le=2016, validation_alias=_env("MAX_PROCESS_RES")
    )
    allow_private_urls: bool = Field(default=False, validation_alias=_env("DA3_ALLOW_PRIVATE_URLS"))
    # Most points a request's scene outputs may ask for (`max_points`).
    max_points: int = Field(default=2_000_000, ge=1, validation_alias=_env("MAX_POINTS"))
    # Longest image_base64 (or images[].base64) text; None: `base64_chars_limit`'s default.
    max_base64_chars: int | None = Field(
        default=None, ge=1, validation_alias=_env("MAX_BASE64_CHARS")
    )
    # Self-hosted: the time a request body has to arrive.
    body_timeout_s: float = Field(default=60.0, gt=0, validation_alias=_env("BODY_TIMEOUT_S"))

    # Self-hosted server
    max_body_bytes: int = Field(default=100_000_000, ge=1, validation_alias=_env("MAX_BODY_BYTES"))
    # RunPod's /v2 paths take what RunPod itself takes: 10 MB on /run, 20 MB on /runsync.
    max_run_body_bytes: int = Field(
        default=10_000_000, ge=1, validation_alias=_env("MAX_RUN_BODY_BYTES")
    )
    max_runsync_body_bytes: int = Field(
        default=20_000_000, ge=1, validation_alias=_env("MAX_RUNSYNC_BODY_BYTES")
    )
    max_queue: int = Field(default=16, ge=1, validation_alias=_env("MAX_QUEUE"))
    model_concurrency: int = Field(default=1, ge=1, validation_alias=_env("MODEL_CONCURRENCY"))
    # Batching (self-hosted and RunPod): single-photo requests gathered into one forward.
    max_batch: int = Field(default=8, ge=1, le=256, validation_alias=_env("MAX_BATCH"))
    batch_wait_ms: float = Field(
        default=10.0, ge=0, le=10_000, validation_alias=_env("BATCH_WAIT_MS")
    )
    max_jobs: int = Field(default=1000, ge=1, validation_alias=_env("MAX_JOBS"))
    # How long finished results stay for /status: /run's (RunPod keeps them 30 min), /runsync's
    # (RunPod: 1 min).
    job_ttl_s: float = Field(default=1800.0, gt=0, validation_alias=_env("JOB_TTL_S"))
    runsync_ttl_s: float = Field(default=60.0, ge=0, validation_alias=_env("RUNSYNC_TTL_S"))
    # A /v2 job's `webhook`: each try's time limit, and the wait between RunPod's three tries.
    webhook_timeout_s: float = Field(default=10.0, gt=0, validation_alias=_env("WEBHOOK_TIMEOUT_S"))
    webhook_retry_delay_s: float = Field(
        default=10.0, ge=0, validation_alias=_env("WEBHOOK_RETRY_DELAY_S")
    )
    # Finished /run results held in memory, in bytes of their JSON; the oldest go first.
    max_job_bytes: int = Field(default=200_000_000, ge=1, validation_alias=_env("MAX_JOB_BYTES"))
    shutdown_grace_s: float = Field(default=60.0, ge=0, validation_alias=_env("SHUTDOWN_GRACE_S"))
    # Concurrent HTTP requests before our 503 (uvicorn's own limit is a higher backstop).
    max_connections: int = Field(default=64, ge=1, validation_alias=_env("MAX_CONNECTIONS"))
    keep_alive_s: float = Field(default=5.0, gt=0, le=300, validation_alias=_env("KEEP_ALIVE_S"))
    # Largest incomplete HTTP event (request line + headers) uvicorn buffers.
    max_header_bytes: int = Field(
        default=16_384, ge=1024, le=1_048_576, validation_alias=_env("MAX_HEADER_BYTES")
    )

    # Client (`da3-serverless request`)
    endpoint: str | None = Field(default=None, validation_alias=_env("DA3_ENDPOINT"))
    runpod_api_key: str | None = Field(
        default=None, validation_alias=_env("RUNPOD_API_KEY"), repr=False
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, name: str | None) -> str | None:
        if name is not None and not DEVICE_PATTERN.fullmatch(name):
            raise ValueError("use cpu, cuda, cuda:N, mps or xpu")
        return name

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, name: str | None) -> str | None:
        if name is None:
            return None
        if name.lower() not in DTYPE_NAMES:
            raise ValueError(f"use one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[name.lower()]

    def for_server(self) -> Settings:
        """These settings as the self-hosted server uses them: MAX_RESPONSE_BYTES, when not
        set, is SERVER_MAX_RESPONSE_BYTES."""
        if "max_response_bytes" in self.model_fields_set:
            return self
        return self.model_copy(update={"max_response_bytes": SERVER_MAX_RESPONSE_BYTES})

    @property
    def workspace_dir(self) -> Path:
        """`WORKSPACE`, else `da3-serverless` in the user's data folder (`user_folders`).
        The container's bootstrap.sh chooses a volume and passes it as WORKSPACE."""
        return self.workspace if self.workspace is not None else self._user_folders[0]

    @property
    def workspace_reason(self) -> str:
        """Why `workspace_dir` is where it is, for the start log."""
        if self.workspace is not None:
            return "WORKSPACE is set"
        return "WORKSPACE is unset: this user's data folder"

    @cached_property
    def _user_folders(self) -> tuple[Path, Path]:
        return user_folders(self.data_home, self.cache_home)

    @property
    def base64_chars_limit(self) -> int:
        """MAX_BASE64_CHARS, by default the base64 text of a MAX_DOWNLOAD_BYTES file with room
        for line breaks (3 %) and a data: URI prefix."""
        if self.max_base64_chars is not None:
            return self.max_base64_chars
        return -(-self.max_download_bytes // 3) * 4 * 103 // 100 + 1024

    @property
    def cache_dir(self) -> Path:
        """Hugging Face cache root: `HF_HOME`, else the workspace's `cache/` when WORKSPACE is
        set, else `da3-serverless` in the user's cache folder."""
        if self.hf_home is not None:
            return self.hf_home
        return self.workspace / "cache" if self.workspace is not None else self._user_folders[1]

    @property
    def models_dir(self) -> Path:
        return self.workspace_dir / "models"

    @property
    def output_dir(self) -> Path:
        return self.workspace_dir / "output_images"

    @property
    def compile_cache_dir(self) -> Path:
        return self.workspace_dir / "compile-cache"


def user_folders(data_home: Path | None, cache_home: Path | None) -> tuple[Path, Path]:
    """(data, cache) folders named `da3-serverless` that this user can write, as the platform
    places them: XDG_DATA_HOME / XDG_CACHE_HOME (default ~/.local/share, ~/.cache) on Linux,
    ~/Library/Application Support and ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows."""
    home = Path.home()
    if sys.platform == "darwin":
        data, cache = home / "Library" / "Application Support", home / "Library" / "Caches"
    elif sys.platform == "win32":
        data = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
        cache = data / "Cache"
    else:
        data, cache = home / ".local" / "share", home / ".cache"
    return (data_home or data) / APP_NAME, (cache_home or cache) / APP_NAME


class SettingsError(ValueError):
    """Settings that cannot work; the message names each variable and its allowed values."""


def load_settings(**overrides: object) -> Settings:
    """`Settings()` from the environment (and `overrides`, by field name), checked: a value
    out of range raises `SettingsError` naming the variable, the value and what is allowed, so
    the worker, the server and the CLI stop before they start broken."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(settings_problems(error)) from None


def settings_problems(error: ValidationError) -> str:
    """One line per bad setting: `NAME=value: what is wrong; allowed: range`."""
    lines = []
    for problem in error.errors(include_url=False):
        name = str(problem["loc"][0]) if problem["loc"] else "?"
        field = Settings.model_fields.get(name)
        if field is None:  # an environment variable: find its field
            field = next(
                (f for f in Settings.model_fields.values() if name in f.validation_alias.choices),
                None,
            )
        elif isinstance(field.validation_alias, AliasChoices):
            name = str(field.validation_alias.choices[0])
        reason = problem["msg"].removeprefix("Value error, ")
        if problem["type"] in RANGE_ERRORS:
            reason = "out of range"
        allowed = _allowed(field) if field is not None else ""
        line = f"{name}={problem.get('input')!r}: {reason}"
        lines.append(f"{line}; allowed: {allowed}" if allowed else line)
    return "invalid settings (fix these environment variables):\n  " + "\n  ".join(lines)


def _allowed(field) -> str:
    """The field's range as text (`>= 1`, `14 to 2016`, `> 0`), from its Field constraints."""
    bounds = {}
    for item in field.metadata:
        for attribute in ("ge", "gt", "le", "lt"):
            if getattr(item, attribute, None) is not None:
                bounds[attribute] = getattr(item, attribute)
    if "ge" in bounds and "le" in bounds:
        return f"{bounds['ge']} to {bounds['le']}"
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{words[key]} {value}" for key, value in bounds.items())
