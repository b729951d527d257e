"""A bounded load test on loopback: 200 requests, 8 at a time, against `da3-serverless serve`
with a random-weight da3-small on CPU at a small process_res.

Asserts: no 5xx other than the documented 503 `overloaded` backpressure, and the server's RSS
after the last 50 requests within 5% of its RSS after the first 50 (no leak per request).
Latency p50/p95 are printed, not asserted.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import TEST_API_KEY
from paths import IMAGES
from servers import serve_process

REQUESTS = 200
CONCURRENCY = 8
WINDOW = 50


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def small_photo() -> str:
    """soh-000 at a quarter of its size, as base64 PNG (keeps decode/encode cheap)."""
    with Image.open(IMAGES / "soh-000.png") as photo:
        small = photo.convert("RGB").resize((photo.width // 4, photo.height // 4))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def hammer(url: str, pid: int) -> tuple[list[tuple[int, str | None, float]], list[int]]:
    """Send REQUESTS requests, CONCURRENCY at a time. Returns (status, error code, seconds) per
    request and the server's RSS after the first and the last WINDOW requests."""
    payload = {"image_base64": small_photo(), "process_res": 70, "output_metric": False}
    headers = {"X-API-Key": TEST_API_KEY}
    gate = asyncio.Semaphore(CONCURRENCY)
    results: list[tuple[int, str | None, float]] = []
    rss: list[int] = []

    async def one(client: httpx.AsyncClient) -> None:
        async with gate:
            start = time.perf_counter()
            response = await client.post(f"{url}/runsync", json=payload, headers=headers)
            elapsed = time.perf_counter() - start
            code = (
                response.json().get("error", {}).get("code")
                if response.status_code != 200
                else None
            )
            results.append((response.status_code, code, elapsed))
            if len(results) == WINDOW:
                rss.append(rss_bytes(pid))

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(one(client) for _ in range(REQUESTS)))
    rss.append(rss_bytes(pid))
    return results, rss


@pytest.fixture(scope="module")
def server(hf_cache, tmp_path_factory):
    import conftest

    env = conftest.service_env.__wrapped__(hf_cache, tmp_path_factory.mktemp("load"))
    with serve_process(env, tmp_path_factory.mktemp("serve") / "serve.log") as served:
        yield served


@pytest.mark.slow
def test_load(server):
    url, process = server
    results, (rss_first, rss_last) = asyncio.run(hammer(url, process.pid))
    assert len(results) == REQUESTS
    unexpected = [(s, c) for s, c, _ in results if s >= 500 and (s, c) != (503, "overloaded")]
    assert unexpected == []
    ok = [seconds for status, _, seconds in results if status == 200]
    assert len(ok) + sum(s == 503 for s, _, _ in results) == REQUESTS
    growth = (rss_last - rss_first) / rss_first
    p50, p95 = np.percentile(ok, [50, 95]) * 1000
    print(
        f"\nload: {len(ok)}/{REQUESTS} ok, {REQUESTS - len(ok)} overloaded; "
        f"latency p50 {p50:.0f} ms, p95 {p95:.0f} ms; RSS {rss_first / 2**20:.0f} -> "
        f"{rss_last / 2**20:.0f} MiB ({growth:+.1%})"
    )
    assert growth <= 0.05
