"""RunPod's request fields beside `input`, applied on the self-hosted `/v2` paths as RunPod
applies them (docs: "Send requests" / "Job operations"):

- `policy.executionTimeout` (ms, at least 5 s): a job running longer is stopped by the cancel
  path (it frees the model at its next check and leaves no file) and ends `TIMED_OUT`;
- `policy.ttl` (ms, 10 s to 7 days, 24 h by default): the job's whole lifetime, queued and
  running; past it the job ends `TIMED_OUT` the same way;
- `policy.lowPriority`: accepted (RunPod then does not scale up for the job; one server has
  no workers to add);
- `webhook`: when the job ends, its object (as `/status` answers it) is POSTed there, through
  the same address checks as downloads, three tries `WEBHOOK_RETRY_DELAY_S` apart, each
  within `WEBHOOK_TIMEOUT_S`;
- `s3Config`: the job's own bucket for its outputs (`api/job.py`).

A job that ends FAILED or TIMED_OUT keeps its request for `/retry` as long as the job is kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from da3_serverless.api.download import post_json
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.job import bucket_from_s3_config
from da3_serverless.api.storage import Bucket
from da3_serverless.server.jobs import Admitted, job_body
from da3_serverless.server.queue import FAILED, TIMED_OUT, Job, result_bytes
from da3_serverless.server.state import AppState

log = logging.getLogger(__name__)

FIELDS = frozenset({"webhook", "policy", "s3Config"})
POLICY_FIELDS = ("executionTimeout", "lowPriority", "ttl")
MIN_EXECUTION_TIMEOUT_MS = 5_000
MIN_TTL_MS, MAX_TTL_MS, DEFAULT_TTL_MS = 10_000, 7 * 24 * 3_600_000, 24 * 3_600_000
WEBHOOK_TRIES = 3  # RunPod's: the first and two retries
CHECK_EVERY_S = 0.05  # how often a job's time limits are looked at


@dataclass
class RunPodOptions:
    """A job's RunPod fields, checked."""

    execution_timeout_s: float | None = None
    ttl_s: float = DEFAULT_TTL_MS / 1000
    low_priority: bool = False
    webhook: str | None = None
    bucket: Bucket | None = None


def parse_options(beside: dict[str, Any]) -> RunPodOptions:
    """The fields beside `input` as `RunPodOptions`; `invalid_input` saying what is wrong."""
    policy = beside.get("policy") or {}
    if not isinstance(policy, dict) or set(policy) - set(POLICY_FIELDS):
        raise ServiceError(
            "invalid_input", f"policy must be an object of {', '.join(POLICY_FIELDS)}"
        )
    options = RunPodOptions(bucket=bucket_from_s3_config(beside.get("s3Config")))
    timeout = policy.get("executionTimeout")
    if timeout is not None:
        options.execution_timeout_s = _milliseconds(
            "policy.executionTimeout", timeout, MIN_EXECUTION_TIMEOUT_MS, MAX_TTL_MS
        )
    if policy.get("ttl") is not None:
        options.ttl_s = _milliseconds("policy.ttl", policy["ttl"], MIN_TTL_MS, MAX_TTL_MS)
    if not isinstance(policy.get("lowPriority", False), bool):
        raise ServiceError("invalid_input", "policy.lowPriority must be true or false")
    options.low_priority = policy.get("lowPriority", False)
    webhook = beside.get("webhook")
    if webhook is not None and not (
        isinstance(webhook, str) and webhook.startswith(("http://", "https://"))
    ):
        raise ServiceError("invalid_input", "webhook must be an http:// or https:// URL")
    options.webhook = webhook
    return options


def _milliseconds(name: str, value: object, least: int, most: int) -> float:
    """`value` milliseconds as seconds, checked to be a number from `least` to `most`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not least <= value <= most:
        raise ServiceError(
            "invalid_input", f"{name} is in milliseconds, from {least} to {most}: got {value!r}"
        )
    return value / 1000


async def follow(state: AppState, job: Job, admitted: Admitted, options: RunPodOptions) -> None:
    """Until `job` ends: stop it once past its time limits. Then keep its request for `/retry`
    when it failed or timed out, and post its webhook."""
    if job.task is not None:
        while not job.task.done():
            reason = _past_limits(job, options, time.monotonic())
            if reason is not None:
                job.request_cancel(reason, TIMED_OUT)
                await asyncio.shield(job.task)
                break
            await asyncio.wait({job.task}, timeout=CHECK_EVERY_S)
    if job.status in (FAILED, TIMED_OUT):
        job.retry = (admitted, options)
        job.size += await anyio.to_thread.run_sync(result_bytes, admitted.payload)
    if options.webhook is not None:
        await send_webhook(state, options.webhook, job_body(job))


def _past_limits(job: Job, options: RunPodOptions, now: float) -> str | None:
    """Why `job` must stop now (its ttl, or its execution timeout once running), or None."""
    if now - job.created > options.ttl_s:
        return f"the job outlived its policy.ttl ({options.ttl_s * 1000:.0f} ms)"
    timeout = options.execution_timeout_s
    if timeout is not None and job.started is not None and now - job.started > timeout:
        return f"the job ran past its policy.executionTimeout ({timeout * 1000:.0f} ms)"
    return None


async def send_webhook(state: AppState, url: str, body: dict[str, Any]) -> bool:
    """POST `body` to `url`: up to `WEBHOOK_TRIES` tries, `WEBHOOK_RETRY_DELAY_S` apart, until
    one is answered 2xx (True). Failures are logged (host only: the URL may hold a token)."""
    settings = state.settings
    data = json.dumps(body).encode()
    for attempt in range(WEBHOOK_TRIES):
        if attempt:
            await asyncio.sleep(settings.webhook_retry_delay_s)
        try:
            status = await anyio.to_thread.run_sync(
                post_json, url, data, settings, settings.webhook_timeout_s
            )
        except ServiceError as error:
            log.warning("webhook of job %s, try %d: %s", body["id"], attempt + 1, error.message)
            continue
        if 200 <= status < 300:
            return True
        log.warning("webhook of job %s, try %d: HTTP %d", body["id"], attempt + 1, status)
    return False
