"""Shared fixtures: random-weight DA3 snapshots in the official layout, placed where the real
loading path looks for them (a folder, or a Hugging Face cache), and service environments."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SMALL_REPO = "depth-anything/DA3-SMALL"
TEST_API_KEY = "test-key-0123456789"
FAKE_REVISION = "0" * 40


def place_in_hf_cache(snapshot: Path, cache_dir: Path, repo_id: str) -> Path:
    """Lay out `snapshot` as huggingface_hub's cache does for `repo_id` (refs/main -> a
    snapshots/<revision>/ folder), so offline lookups find it. Returns the hub cache dir."""
    hub = cache_dir / "hub"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    target = repo / "snapshots" / FAKE_REVISION
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(snapshot / name, target / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(FAKE_REVISION)
    return hub


@pytest.fixture(scope="session")
def small_snapshot(tmp_path_factory) -> Path:
    """A random-weight da3-small snapshot folder (config.json + model.safetensors)."""
    from da3_serverless.model.checkpoint import write_random_checkpoint

    return write_random_checkpoint("da3-small", tmp_path_factory.mktemp("da3-small"), seed=0)


@pytest.fixture(scope="session")
def hf_cache(small_snapshot, tmp_path_factory) -> Path:
    """An HF_HOME holding the random da3-small snapshot as depth-anything/DA3-SMALL."""
    cache = tmp_path_factory.mktemp("hf-home")
    place_in_hf_cache(small_snapshot, cache, SMALL_REPO)
    return cache


@pytest.fixture
def service_env(hf_cache, tmp_path) -> dict[str, str]:
    """Environment for a service subprocess: offline, the random da3-small as default model,
    a temporary workspace, an API key, private image URLs allowed (tests serve images from
    127.0.0.1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DA3_", "HF_", "RUNPOD"))}
    env.update(
        HF_HOME=str(hf_cache),
        HF_HUB_OFFLINE="1",
        WORKSPACE=str(tmp_path / "workspace"),
        RUNPOD_VOLUME=str(tmp_path / "no-volume"),
        MODEL_ID=SMALL_REPO,
        DA3_API_KEY=TEST_API_KEY,
        DA3_ALLOW_PRIVATE_URLS="1",
        DA3_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
    )
    return env
