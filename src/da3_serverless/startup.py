"""Checks a transport runs before it starts (`da3-serverless serve`, the RunPod worker): the
workspace can be written and the default model's weights are on disk or downloadable. Each
failure is a `StartupError` whose message says in three lines what is wrong, why, and what to
do next; the transports print it without a traceback and exit."""

from __future__ import annotations

import tempfile
from pathlib import Path

from da3_serverless.config import Settings
from da3_serverless.inference.weights import ModelNotFoundError, WeightLocator


class StartupError(RuntimeError):
    """The service cannot start; the message (three lines) says what to do."""


def workspace_line(settings: Settings) -> str:
    """For the start log: where the workspace and the model cache are, and why there."""
    return (f"workspace {settings.workspace_dir} ({settings.workspace_reason}); "
            f"model cache {settings.cache_dir}")  # fmt: skip


def check_workspace(settings: Settings) -> None:
    """The outputs' folder, and the model cache unless HF_HOME names one (the image's baked
    cache is read-only), exist and take a file; else StartupError."""
    folders = [settings.output_dir]
    if settings.hf_home is None:
        folders.append(settings.cache_dir)
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
    except OSError as error:
        place = Path(error.filename) if error.filename else settings.workspace_dir
        raise StartupError(
            f"cannot write to {place} ({error.strerror or error})\n"
            f"the workspace {settings.workspace_dir} was chosen because "
            f"{settings.workspace_reason}; the model cache is {settings.cache_dir}\n"
            "next: set WORKSPACE to a folder you can write (WORKSPACE=$PWD/workspace), or "
            "HF_HOME for the model cache"
        ) from None


def check_model(settings: Settings) -> list[Path]:
    """The default model's snapshot folders (two for a pair), downloaded if need be; else
    StartupError with ModelNotFoundError's three lines (where, the hub, what next)."""
    try:
        return WeightLocator.from_settings(settings).resolve_all(settings.model_id)
    except ModelNotFoundError as error:
        raise StartupError(str(error)) from None


def check_start(settings: Settings) -> list[Path]:
    """Both checks, the workspace first; returns the model's snapshot folders."""
    check_workspace(settings)
    return check_model(settings)
