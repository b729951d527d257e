"""API key checks: constant-time compare, refusal without a configured key, header parsing."""

from __future__ import annotations

import pytest

from da3_serverless.api.auth import check_api_key, key_from_headers
from da3_serverless.api.errors import ServiceError
from da3_serverless.config import Settings

SECRET = "s3cr3t-ключ"  # non-ASCII on purpose: compared as UTF-8 bytes


def refused(provided: str | None, settings: Settings) -> str:
    with pytest.raises(ServiceError) as info:
        check_api_key(provided, settings)
    assert info.value.code == "unauthorized" and info.value.status == 401
    assert SECRET not in info.value.message
    if provided and provided.strip():
        assert provided not in info.value.message
    return info.value.message


def test_right_key_passes() -> None:
    check_api_key(SECRET, Settings(api_key=SECRET))


@pytest.mark.parametrize("provided", ["nope-123", SECRET + "x", SECRET[:-1], "S3CR3T-ключ", "\t"])
def test_wrong_key_is_refused(provided: str) -> None:
    assert "wrong API key" in refused(provided, Settings(api_key=SECRET))


@pytest.mark.parametrize("provided", [None, ""])
def test_missing_key_is_refused(provided: str | None) -> None:
    assert "missing API key" in refused(provided, Settings(api_key=SECRET))


def test_no_key_configured_refuses_and_says_how_to_fix() -> None:
    message = refused("anything", Settings(api_key=None))
    assert "DA3_API_KEY" in message and "DA3_ALLOW_UNAUTHENTICATED=1" in message
    refused(None, Settings(api_key=""))


def test_allow_unauthenticated_without_key() -> None:
    settings = Settings(api_key=None, allow_unauthenticated=True)
    check_api_key(None, settings)
    check_api_key("whatever", settings)


def test_configured_key_still_required_when_unauthenticated_is_allowed() -> None:
    # The escape hatch only applies when no key is configured.
    settings = Settings(api_key=SECRET, allow_unauthenticated=True)
    refused("nope-123", settings)
    check_api_key(SECRET, settings)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer abc"}, "abc"),
        ({"authorization": "bearer  abc "}, "abc"),
        ({"AUTHORIZATION": "BEARER abc"}, "abc"),
        ({"X-API-Key": "abc"}, "abc"),
        ({"x-api-key": "abc"}, "abc"),
        ({"DA3-API-KEY": "abc"}, "abc"),
        ({"Authorization": "Bearer abc", "X-API-Key": "other"}, "abc"),
        ({"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": "abc"}, "abc"),
        ({"Authorization": "Bearer "}, None),
        ({"Authorization": "abc"}, "abc"),  # bare, as RunPod takes its key too
        ({"Content-Type": "application/json"}, None),
        ({}, None),
    ],
)
def test_key_from_headers(headers: dict[str, str], expected: str | None) -> None:
    assert key_from_headers(headers) == expected


def test_key_from_headers_then_check() -> None:
    settings = Settings(api_key=SECRET)
    check_api_key(key_from_headers({"X-Api-Key": SECRET}), settings)
    refused(key_from_headers({"X-Api-Key": "nope"}), settings)
