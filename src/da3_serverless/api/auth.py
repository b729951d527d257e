"""API key check (docs/ARCHITECTURE.md §5): constant-time comparison, and every request
refused when no key is configured."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from da3_serverless.api.errors import ServiceError
from da3_serverless.config import Settings

# Header names a self-hosted client may use, besides `Authorization: Bearer <key>`.
KEY_HEADERS = ("x-api-key", "da3-api-key")


def check_api_key(provided: str | None, settings: Settings) -> None:
    """Return if `provided` matches `settings.api_key` (DA3_API_KEY); else raise
    `ServiceError("unauthorized")`. With no key configured every request is refused unless
    `settings.allow_unauthenticated` (DA3_ALLOW_UNAUTHENTICATED=1). Never echoes either key."""
    expected = settings.api_key
    if not expected:
        if settings.allow_unauthenticated:
            return
        raise ServiceError(
            "unauthorized",
            "this server has no API key configured, so it refuses all requests: set DA3_API_KEY "
            "on the server (and send it as api_key), or set DA3_ALLOW_UNAUTHENTICATED=1 to serve "
            "without a key",
        )
    if not provided:
        raise ServiceError(
            "unauthorized",
            "missing API key: send it as the api_key field of the input (or, over HTTP, as an "
            "'Authorization: Bearer <key>' or 'X-API-Key' header)",
        )
    # Compare bytes: compare_digest on str rejects non-ASCII, which would make the outcome
    # depend on the characters rather than on equality.
    if not hmac.compare_digest(provided.encode("utf-8"), expected.encode("utf-8")):
        raise ServiceError(
            "unauthorized", "wrong API key: check the key you send against the server's DA3_API_KEY"
        )


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The API key from HTTP headers (names case-insensitive): `Authorization: Bearer <key>`
    (or a bare `Authorization: <key>`, which RunPod accepts too), else `X-API-Key`, else
    `da3-api-key`; None when none is present."""
    lowered = {name.lower(): value for name, value in headers.items()}
    auth = lowered.get("authorization", "")
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if scheme and not token and scheme.lower() != "bearer":
        return scheme
    for name in KEY_HEADERS:
        value = lowered.get(name, "").strip()
        if value:
            return value
    return None
