"""Shared fixtures: random-weight DA3 snapshots in the official layout, placed where the real
loading path looks for them (a folder, or a Hugging Face cache), and service environments."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from da3_serverless.config import Settings

SMALL_REPO = "depth-anything/DA3-SMALL"
TEST_API_KEY = "test-key-0123456789"
FAKE_REVISION = "0" * 40

# `make test-fast` loads this Hypothesis profile (--hypothesis-profile=fast): the property
# tests draw a tenth of their examples there; the full suite draws them all.
FAST_PROFILE = "fast"
hypothesis_settings.register_profile(FAST_PROFILE, max_examples=20)


def pytest_report_header(config) -> str:
    """Where the run's temp files go and what room there is: a failure for want of memory or
    disk (the giant snapshots write GB) can then be read off the log. Linux only; elsewhere
    just the folder."""
    folder = config._tmp_path_factory.getbasetemp()
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        meminfo = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return f"temp files: {folder}"
    mount = max((m for m in mounts if str(folder).startswith(m[1])), key=lambda m: len(m[1]))
    free = shutil.disk_usage(folder).free / 2**30
    available = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable"))
    return (
        f"temp files: {folder} on {mount[2]} ({mount[1]}), {free:.1f} GiB free; "
        f"memory available: {available / 2**20:.1f} GiB"
    )


def examples(full: int) -> int:
    """A property test's example count: `full`, or a tenth of it (at least 20) under the
    fast profile."""
    if hypothesis_settings.get_current_profile_name() == FAST_PROFILE:
        return max(20, full // 10)
    return full


def offline_settings(hf_cache: Path | None, workspace: Path, **overrides) -> Settings:
    """A test service's settings: the random da3-small from `hf_cache` (or `model_id` among
    the overrides), offline, on the CPU, the test key, files under `workspace`."""
    values = dict(
        model_id=SMALL_REPO, hf_home=hf_cache, hf_hub_offline=True, workspace=workspace,
        api_key=TEST_API_KEY, device="cpu",
    )  # fmt: skip
    return Settings(**{**values, **overrides})


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


@contextlib.contextmanager
def random_checkpoint(tmp_path_factory, preset: str, seed: int) -> Iterator[Path]:
    """A seeded random snapshot of `preset` in a new temp folder, deleted on leaving.

    The presets above da3-small write 1.3 to 6.4 GB each, and pytest deletes the folders of
    `tmp_path_factory` only once the run is over: left to then, they took the suite's temp
    space to 14 GB, which a machine whose /tmp lives in memory cannot spare. Load what the
    test needs inside the block."""
    from da3_serverless.model.checkpoint import write_random_checkpoint

    folder = tmp_path_factory.mktemp(preset)
    try:
        yield write_random_checkpoint(preset, folder, seed=seed)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# Output channels of the Gaussian head's last convolution: sub-pixel offset (x, y) and depth
# offset.
HEAD_OUT = "model.gs_head.scratch.output_conv2.2"
OFFSET_CHANNELS = [0, 1, 36]


@pytest.fixture(scope="module")
def still_snapshot(tmp_path_factory) -> Path:
    """Random da3-small (seed 0) with a 3D-Gaussian head that predicts no offsets."""
    from safetensors.torch import load_file, save_file

    from da3_serverless.model.checkpoint import WEIGHTS_NAME, write_random_checkpoint

    folder = tmp_path_factory.mktemp("da3-small-gs")
    write_random_checkpoint("da3-small", folder, seed=0, gaussians=True)
    tensors = load_file(str(folder / WEIGHTS_NAME))
    for leaf in ("weight", "bias"):
        tensors[f"{HEAD_OUT}.{leaf}"][OFFSET_CHANNELS] = 0
    save_file(tensors, str(folder / WEIGHTS_NAME))
    return folder


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


# Fixtures that run the service in another process (a server, the worker, a CLI command) or
# give the environment for one: their tests are marked `server`, which `make test-fast` leaves
# out. A new such fixture belongs here (test_code_shape finds those that start a server).
PROCESS_FIXTURES = {
    "service_env", "module_env", "transport_env", "broken_env", "hostile_env",
    "service_env_module", "served", "self_hosted", "runpod_local", "server", "strict_server",
    "worker", "strict_worker", "small_server",
}  # fmt: skip


@pytest.fixture(scope="module")
def small_server(hf_cache, tmp_path_factory) -> Iterator[str]:
    """`da3-serverless serve` with the random da3-small as its model (service_env's
    environment) for a test module; yields its URL."""
    from servers import serve_process

    env = service_env.__wrapped__(hf_cache, tmp_path_factory.mktemp("service"))
    with serve_process(env, tmp_path_factory.mktemp("serve") / "serve.log") as (url, _):
        yield url


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (server mode: real HTTP, as a bucket is reached)."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


# Bytes longer than this are files: a failed comparison names them by size and digest.
_FILE_BYTES = 4096


def pytest_assertrepr_compare(op: str, left: object, right: object) -> list[str] | None:
    """A failed `==` of files (bytes, or dicts of them) says which differ, by size and digest,
    instead of pytest's diff: difflib over megabytes takes hours, and on CI pytest does not
    truncate it."""
    if op != "==" or not (_holds_file(left) or _holds_file(right)):
        return None
    if isinstance(left, dict) and isinstance(right, dict):
        lines = [f"{key!r}: {_digest(left.get(key))} != {_digest(right.get(key))}"
                 for key in sorted({*left, *right}, key=str)
                 if left.get(key) != right.get(key)]  # fmt: skip
        return ["dicts of files differ:", *lines]
    return [f"{_digest(left)} != {_digest(right)}"]


def _holds_file(value: object) -> bool:
    if isinstance(value, dict):
        return any(_holds_file(item) for item in value.values())
    return isinstance(value, bytes | bytearray) and len(value) > _FILE_BYTES


def _digest(value: object) -> str:
    if not isinstance(value, bytes | bytearray):
        return "missing" if value is None else type(value).__name__
    return f"{len(value)} bytes sha256 {hashlib.sha256(value).hexdigest()[:16]}"
