"""RunPod's own `JobScaler` over one job, for the tests that stop a job the way RunPod does:
the scaler takes the job, the stop signal for it arrives once the test says so, and the scaler
cancels the handler's task. No network: the fetchers and the job handler are the SDK's
override points."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from runpod.serverless.modules.rp_job import run_job
from runpod.serverless.modules.rp_scale import JobScaler


def stop_one_job(
    handler: Callable, job: dict, stop_when: threading.Event, timeout_s: float = 300
) -> tuple[list[dict], dict[str, float]]:
    """Run the scaler with `handler` over `job` alone; its stop signal is sent once `stop_when`
    is set. Returns what the job reported (nothing when the stop worked) and the monotonic
    times at which the job was `taken`, `stopped` (signal sent) and its task `free` (ended)."""
    reported: list[dict] = []
    times: dict[str, float] = {}

    async def jobs_fetcher(session, count):
        if not times:
            times["taken"] = time.monotonic()
            return [job]
        await asyncio.sleep(0.1)
        return None

    async def stop_signals_fetcher(session):
        if "stopped" in times:
            await asyncio.sleep(0.1)
            return []
        await asyncio.to_thread(stop_when.wait, timeout_s)
        times["stopped"] = time.monotonic()
        return [job["id"]]

    async def jobs_handler(session, config, taken):
        reported.append(await run_job(config["handler"], taken))

    async def scenario() -> None:
        scaler = JobScaler({"handler": handler, "jobs_fetcher": jobs_fetcher,
                            "jobs_handler": jobs_handler,
                            "stop_signals_fetcher": stop_signals_fetcher})  # fmt: skip
        running = asyncio.create_task(scaler.run())
        deadline = time.monotonic() + timeout_s
        while "stopped" not in times or job["id"] in scaler.jobs_tasks:
            assert time.monotonic() < deadline and not running.done()
            await asyncio.sleep(0.02)
        times["free"] = time.monotonic()
        scaler.kill_worker()
        await asyncio.wait_for(running, 60)

    asyncio.run(scenario())
    return reported, times
