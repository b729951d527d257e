"""Reading a request body: at most `limit` bytes, parsed as JSON, unwrapped from RunPod's form."""

from __future__ import annotations

import json

import anyio.to_thread
from fastapi import Request

from da3_serverless.api.errors import ServiceError

# Bodies larger than this are parsed off the event loop, which keeps serving /health meanwhile.
THREAD_PARSE_BYTES = 1_000_000


async def read_json(request: Request, limit: int) -> object:
    """The body parsed as JSON, refused past `limit` bytes before it is all read."""
    too_large = ServiceError(
        "image_too_large", f"request body over {limit} bytes (MAX_BODY_BYTES); send a smaller "
        "image or pass it by image_url",
    )  # fmt: skip
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        if len(body) > THREAD_PARSE_BYTES:
            return await anyio.to_thread.run_sync(json.loads, body)
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError("invalid_input", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ServiceError("invalid_input", "the body's JSON is nested too deeply") from None


def in_runpod_form(body: object) -> bool:
    """Whether the body is RunPod's `{"input": ...}` form (which fails in RunPod's form too)."""
    return isinstance(body, dict) and "input" in body


def unwrap(body: object) -> object:
    """The v1 request object of a body, bare or in RunPod's form."""
    if not in_runpod_form(body):
        return body
    assert isinstance(body, dict)
    if set(body) != {"input"}:
        extra = sorted(name[:40] for name in set(body) - {"input"})[:5]
        raise ServiceError(
            "invalid_input", f"only 'input' is supported in the RunPod form, not {extra}"
        )
    return body["input"]
