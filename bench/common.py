"""Shared pieces of the benchmarks: random snapshots, the reference oracle, timing."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "tests" / "data" / "images"
SNAPSHOTS = REPO / "artifacts" / "bench-snapshots"
sys.path.insert(0, str(REPO / "tests"))  # the reference oracle and the test videos live there

from da3_serverless.model.checkpoint import write_random_checkpoint  # noqa: E402
from reference import load_reference  # noqa: E402
from servers import serve_process  # noqa: E402

__all__ = ["IMAGES", "load_reference", "median_seconds", "snapshot", "start_server"]


def snapshot(preset: str, seed: int = 0) -> Path:
    """A random-weight snapshot of `preset`, written once and reused across runs."""
    folder = SNAPSHOTS / f"{preset}-seed{seed}"
    if not (folder / "model.safetensors").is_file():
        write_random_checkpoint(preset, folder, seed=seed)
    return folder


@contextlib.contextmanager
def start_server(snapshot_folder: Path, workspace: Path, **env: str) -> Iterator[str]:
    """`da3-serverless serve` (the tests' `serve_process`) with the snapshot as its model, no
    key needed, `env` added, its log in `workspace/serve.log`; yields its URL once it is
    ready and stops it on leaving."""
    workspace.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ, "MODEL_ID": str(snapshot_folder), "WORKSPACE": str(workspace),
        "DA3_ALLOW_UNAUTHENTICATED": "1", "MAX_QUEUE": "64", "PYTHONUNBUFFERED": "1", **env,
    }  # fmt: skip
    with serve_process(env, workspace / "serve.log") as (url, _):
        yield url


def median_seconds(fn: Callable[[], object], runs: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` over `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1):
    """Median seconds per named function, calls interleaved so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_gflops(size: int = 2048, runs: int = 5) -> float:
    """Achieved GFLOP/s of a large fp32 matmul: the machine's practical ceiling."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median_seconds(lambda: a @ b, runs=runs, warmup=2)
    return 2 * size**3 / seconds / 1e9
