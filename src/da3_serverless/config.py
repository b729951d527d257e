"""The one place that reads the environment.

Everything else receives a `Settings` object (or the values it needs) as an argument.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_ID = "depth-anything/DA3NESTED-GIANT-LARGE-1.1"


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
        default=None, validation_alias=_env("MODEL_MEMORY_BUDGET_GB")
    )
    warmup: bool = Field(default=True, validation_alias=_env("WARMUP"))
    # Written by the worker once its model is loaded and warm (the image's HEALTHCHECK reads it).
    ready_file: Path | None = Field(default=None, validation_alias=_env("DA3_READY_FILE"))
    hf_hub_offline: bool = Field(default=False, validation_alias=_env("HF_HUB_OFFLINE"))
    hf_home: Path | None = Field(default=None, validation_alias=_env("HF_HOME"))
    hf_token: str | None = Field(default=None, validation_alias=_env("HF_TOKEN"), repr=False)

    # Workspace and storage
    workspace: Path | None = Field(default=None, validation_alias=_env("WORKSPACE"))
    runpod_volume: Path = Field(
        default=Path("/runpod-volume"), validation_alias=_env("RUNPOD_VOLUME")
    )
    output_retention_days: float = Field(default=14, validation_alias=_env("OUTPUT_RETENTION_DAYS"))
    max_response_bytes: int = Field(default=15_000_000, validation_alias=_env("MAX_RESPONSE_BYTES"))
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
    max_image_side: int = Field(default=4096, validation_alias=_env("MAX_IMAGE_SIDE"))
    max_download_bytes: int = Field(default=50_000_000, validation_alias=_env("MAX_DOWNLOAD_BYTES"))
    download_timeout_s: float = Field(default=20.0, validation_alias=_env("DOWNLOAD_TIMEOUT_S"))
    max_views: int = Field(default=16, validation_alias=_env("MAX_VIEWS"))
    # At most the predictor's own ceiling (inference.preprocess.MAX_PROCESS_RES = 2016).
    max_process_res: int = Field(
        default=2016, ge=14, le=2016, validation_alias=_env("MAX_PROCESS_RES")
    )
    allow_private_urls: bool = Field(default=False, validation_alias=_env("DA3_ALLOW_PRIVATE_URLS"))

    # Self-hosted server
    max_body_bytes: int = Field(default=100_000_000, validation_alias=_env("MAX_BODY_BYTES"))
    max_queue: int = Field(default=16, validation_alias=_env("MAX_QUEUE"))
    model_concurrency: int = Field(default=1, validation_alias=_env("MODEL_CONCURRENCY"))
    # Batching (self-hosted and RunPod): single-photo requests gathered into one forward.
    max_batch: int = Field(default=8, ge=1, validation_alias=_env("MAX_BATCH"))
    batch_wait_ms: float = Field(default=10.0, ge=0, validation_alias=_env("BATCH_WAIT_MS"))
    max_jobs: int = Field(default=1000, validation_alias=_env("MAX_JOBS"))
    job_ttl_s: float = Field(default=3600.0, validation_alias=_env("JOB_TTL_S"))
    shutdown_grace_s: float = Field(default=60.0, validation_alias=_env("SHUTDOWN_GRACE_S"))

    # Client (`da3-serverless request`)
    endpoint: str | None = Field(default=None, validation_alias=_env("DA3_ENDPOINT"))
    runpod_api_key: str | None = Field(
        default=None, validation_alias=_env("RUNPOD_API_KEY"), repr=False
    )

    @cached_property
    def workspace_dir(self) -> Path:
        """`WORKSPACE`, else `<RUNPOD_VOLUME>/DA3-Serverless` on a writable volume, else
        `/workspace/DA3-Serverless`."""
        if self.workspace is not None:
            return self.workspace
        if self.runpod_volume.is_dir() and os.access(self.runpod_volume, os.W_OK):
            return self.runpod_volume / "DA3-Serverless"
        return Path("/workspace/DA3-Serverless")

    @property
    def cache_dir(self) -> Path:
        """Hugging Face cache root (`HF_HOME`), defaulting to the workspace's `cache/`."""
        return self.hf_home if self.hf_home is not None else self.workspace_dir / "cache"

    @property
    def models_dir(self) -> Path:
        return self.workspace_dir / "models"

    @property
    def output_dir(self) -> Path:
        return self.workspace_dir / "output_images"

    @property
    def compile_cache_dir(self) -> Path:
        return self.workspace_dir / "compile-cache"
