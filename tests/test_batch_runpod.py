"""Batching in the RunPod worker: it takes several jobs at once (its `concurrency_modifier`) and
batches them as the self-hosted server does. RunPod's local test API ignores the concurrency
modifier, so the jobs go through the SDK's own `JobScaler`, with its job fetcher and job
handler overridden as the SDK allows in local tests (no RUNPOD_WEBHOOK_GET_JOB), around the
real handler and the real service (random-weight da3-small)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from runpod.serverless.modules import rp_job, rp_scale

from batch_photos import assert_same_answer, base64_photos, payload
from conftest import TEST_API_KEY, offline_settings
from da3_serverless.config import Settings
from da3_serverless.runpod_worker import jobs_at_once, worker_config
from da3_serverless.service import Service


@pytest.fixture(scope="module")
def service(hf_cache, tmp_path_factory) -> Service:
    workspace = tmp_path_factory.mktemp("workspace")
    settings = offline_settings(
        hf_cache, workspace, warmup=False, max_batch=8, batch_wait_ms=500,
        request_budget_tokens=16 * 1296,
    )  # fmt: skip
    service = Service(settings)
    service.start()
    return service


def run_scaler(config: dict, jobs: list[dict], timeout_s: float = 600) -> tuple[dict, list]:
    """Run RunPod's JobScaler until every job has its result: the fetcher hands out the jobs
    as the scaler asks for them. Returns {job id: result} and the job counts asked for."""
    pending, results, asked = list(jobs), {}, []

    async def jobs_fetcher(session, jobs_needed: int) -> list[dict]:
        asked.append(jobs_needed)
        if not pending:
            await asyncio.sleep(0.05)  # as a long poll that found nothing
            return []
        taken, pending[:] = pending[:jobs_needed], pending[jobs_needed:]
        return taken

    async def jobs_handler(session, config: dict, job: dict) -> None:
        results[job["id"]] = await rp_job.run_job(config["handler"], job)
        if len(results) == len(jobs):
            scaler.kill_worker()

    overrides = {"jobs_fetcher": jobs_fetcher, "jobs_handler": jobs_handler}
    scaler = rp_scale.JobScaler({**config, **overrides})
    asyncio.run(asyncio.wait_for(scaler.run(), timeout_s))
    return results, asked


@pytest.mark.slow
def test_the_worker_takes_8_jobs_at_once_and_batches_them(service, tmp_path, caplog):
    assert rp_scale.IS_LOCAL_TEST  # the SDK honours the overrides only in local tests
    photos = base64_photos(tmp_path)
    config = worker_config(service)
    assert config["concurrency_modifier"](1) == 8
    jobs = [
        {"id": f"job-{i}", "input": {**payload(photo), "api_key": TEST_API_KEY}}
        for i, photo in enumerate(photos)
    ]
    jobs.append({"id": "job-bad-key", "input": {**payload(photos[0]), "api_key": "wrong"}})
    caplog.set_level(logging.INFO, logger="da3_serverless.server.batching")

    results, asked = run_scaler(config, jobs)

    assert asked[0] == 8  # the scaler asked for MAX_BATCH jobs at once
    sizes = [r.fields["batch"] for r in caplog.records if r.getMessage() == "batch formed"]
    assert sum(sizes) == 8 and max(sizes) > 1, sizes
    assert "unauthorized" in results.pop("job-bad-key")["error"]
    for index, photo in enumerate(photos):
        alone = service.handle({**payload(photo), "api_key": TEST_API_KEY})
        assert_same_answer(results[f"job-{index}"]["output"], alone)


def test_the_request_budget_bounds_the_jobs_taken_at_once(hf_cache, tmp_path):
    def at_once(**settings) -> int:
        return jobs_at_once(Service(Settings(hf_home=hf_cache, workspace=tmp_path, **settings)))

    square_504 = (504 // 14) ** 2  # tokens of one square view at the native 504 px
    assert at_once(max_batch=8, request_budget_tokens=100 * square_504) == 8
    assert at_once(max_batch=8, request_budget_tokens=3 * square_504) == 3
    assert at_once(max_batch=8, request_budget_tokens=square_504 // 2) == 1
    assert at_once(max_batch=1) == 1
