"""The self-hosted server over real HTTP with a random-weight da3-small: one camera for every
view, and outputs reaching the caller."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest

from conftest import TEST_API_KEY, offline_settings
from da3_serverless.server import create_app
from da3_serverless.service import Service
from paths import IMAGES
from servers import app_in_thread

RES = 70
PHOTO = base64.b64encode((IMAGES / "soh-000.png").read_bytes()).decode()
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


@pytest.fixture(scope="module")
def server(hf_cache, tmp_path_factory) -> Iterator[str]:
    settings = offline_settings(hf_cache, tmp_path_factory.mktemp("workspace"), max_batch=1)
    service = Service(settings)
    service.start()
    with app_in_thread(create_app(settings, service)) as url:
        yield url


def runsync(url: str, payload: dict) -> httpx.Response:
    return httpx.post(f"{url}/runsync", json=payload, headers=AUTH, timeout=300)


def test_one_intrinsics_matrix_for_every_view_over_http(server):
    k = [[900.0, 0.0, 600.0], [0.0, 900.0, 340.0], [0.0, 0.0, 1.0]]
    views = [{"base64": PHOTO}] * 4
    answer = runsync(server, {"images": views, "process_res": RES, "intrinsics": [k]})
    assert answer.status_code == 200, answer.text
    assert [view["intrinsics"] for view in answer.json()["views"]] == [k] * 4
    focals = {"images": views, "process_res": RES, "focal_length_px": [900, 900, 900]}
    refused = runsync(server, focals)
    assert refused.status_code == 400
    assert "focal_length_px has 3 numbers but the request has 4 view(s)" in refused.text
