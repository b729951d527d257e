"""Reading a request body: at most `limit` bytes within a deadline, its JSON structure bounded
before it is parsed, unwrapped from RunPod's form (docs/ARCHITECTURE.md §5)."""

from __future__ import annotations

import json
import re

import anyio
import anyio.to_thread
from fastapi import Request

from da3_serverless.api.errors import ServiceError

# Bodies larger than this are parsed off the event loop, which keeps serving /health meanwhile.
THREAD_PARSE_BYTES = 1_000_000
# Lists and objects inside each other: a request needs 5 ({"input": {"intrinsics": [[[...]]]}}).
MAX_JSON_DEPTH = 8
_BRACKET_OR_QUOTE = re.compile(rb'[\[\]{}"]')


def max_json_structure(max_views: int) -> int:
    """How many structural bytes (`{`, `[`, `,`, `"`) a body may hold: a real request has a
    few per field and about forty per view (a camera each); a base64 photo has none."""
    return 256 + 128 * max_views


async def read_json(
    request: Request,
    limit: int,
    timeout_s: float = 60.0,
    max_structure: int = 2304,
    limit_name: str = "MAX_BODY_BYTES",
) -> object:
    """The body parsed as JSON; refused past `limit` bytes before it is all read, when it does
    not arrive within `timeout_s`, or (before parsing) when it holds more than `max_structure`
    structural bytes or nests deeper than `MAX_JSON_DEPTH`: parsing then costs about the same
    for every body that gets that far. `limit_name` is the setting the message names."""
    too_large = ServiceError(
        "image_too_large", f"request body over {limit} bytes ({limit_name}); send a smaller "
        "image or pass it by image_url",
    )  # fmt: skip
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    with anyio.move_on_after(timeout_s) as scope:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    if scope.cancelled_caught:
        raise ServiceError(
            "invalid_input",
            f"the request body did not arrive within {timeout_s:g} s (BODY_TIMEOUT_S): send "
            "it at once, or pass large images by image_url",
            status=408,
        )
    check_structure(body, max_structure)
    try:
        if len(body) > THREAD_PARSE_BYTES:
            return await anyio.to_thread.run_sync(json.loads, body)
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError("invalid_input", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ServiceError("invalid_input", "the body's JSON is nested too deeply") from None


def check_structure(body: bytes | bytearray, max_structure: int) -> None:
    """Refuse (413) a body with more than `max_structure` structural bytes or nested deeper
    than `MAX_JSON_DEPTH`, without parsing it: counting is a few fast passes over the bytes."""
    count = sum(body.count(byte) for byte in (b"{", b"[", b",", b'"'))
    if count > max_structure:
        raise ServiceError(
            "image_too_large",
            f"the request body has {count} JSON lists, objects, strings and commas; a request "
            f"has at most {max_structure}: send one request object with the documented fields",
        )
    if json_depth(body) > MAX_JSON_DEPTH:
        raise ServiceError(
            "image_too_large",
            f"the request body nests lists and objects more than {MAX_JSON_DEPTH} deep; a "
            "request needs at most 5: send one request object with the documented fields",
        )


def json_depth(body: bytes | bytearray) -> int:
    """How deeply lists and objects nest in `body`, strings skipped. Visits only brackets and
    quotes, so it is cheap for a body that passed the structure count."""
    depth = deepest = position = 0
    while match := _BRACKET_OR_QUOTE.search(body, position):
        index = match.start()
        char = body[index : index + 1]
        if char == b'"':
            position = _string_end(body, index + 1)
        else:
            depth += 1 if char in b"[{" else -1
            deepest = max(deepest, depth)
            position = index + 1
    return deepest


def _string_end(body: bytes | bytearray, start: int) -> int:
    """The index after the quote that closes the string starting at `start` (or the end)."""
    while (quote := body.find(b'"', start)) >= 0:
        escapes = quote
        while escapes > start and body[escapes - 1] == 0x5C:  # backslash
            escapes -= 1
        if (quote - escapes) % 2 == 0:
            return quote + 1
        start = quote + 1
    return len(body)


def in_runpod_form(body: object) -> bool:
    """Whether the body is RunPod's `{"input": ...}` form (which fails in RunPod's form too)."""
    return isinstance(body, dict) and "input" in body


def unwrap(body: object, beside: frozenset[str] = frozenset()) -> object:
    """The v1 request object of a body, bare or in RunPod's form; `beside`: the fields the
    form may carry beside `input` (RunPod's paths take `webhook`, `policy`, `s3Config`)."""
    if not in_runpod_form(body):
        return body
    assert isinstance(body, dict)
    if set(body) - beside != {"input"}:
        extra = sorted(name[:40] for name in set(body) - beside - {"input"})[:5]
        allowed = ", ".join(repr(name) for name in ["input", *sorted(beside)])
        raise ServiceError(
            "invalid_input", f"the RunPod form takes only {allowed} here, not {extra}"
        )
    return body["input"]
