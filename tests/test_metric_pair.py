"""The Apache-2.0 metric pair: an any-view network (DA3-SMALL here) with DA3METRIC-LARGE, joined
as the nested model joins its two networks, from two snapshots in the HF cache.

The oracle is the nested model's own alignment (`align_to_metric`, proven against the
reference for DA3NESTED) applied to the two networks' separate outputs; the pair must equal it
within 1e-4, in process and through both transports. Random weights: the metric network is a
ViT-L (1.3 GB of fp32), so these tests are slow.
"""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
import torch

from conftest import SMALL_REPO, TEST_API_KEY, place_in_hf_cache, random_checkpoint
from da3_serverless.client import Client
from da3_serverless.inference.catalog import METRIC_REPO, lookup_model
from da3_serverless.inference.predictor import Predictor, PredictRequest
from da3_serverless.inference.weights import WeightLocator
from da3_serverless.model.alignment import align_to_metric
from da3_serverless.model.checkpoint import CheckpointError, load_pair
from paths import IMAGES
from servers import runpod_local_api, serve_process

pytestmark = pytest.mark.slow
PAIR = "depth-anything/DA3-SMALL+depth-anything/DA3METRIC-LARGE"
PHOTOS = [IMAGES / "soh-000.png", IMAGES / "soh-010.png"]
RES = 112
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def metric_snapshot(tmp_path_factory):
    with random_checkpoint(tmp_path_factory, "da3metric-large", seed=1) as folder:
        yield folder


@pytest.fixture(scope="module")
def pair_cache(small_snapshot, metric_snapshot, tmp_path_factory):
    """An HF_HOME holding both releases, each under its own repo id."""
    cache = tmp_path_factory.mktemp("pair-home")
    place_in_hf_cache(small_snapshot, cache, SMALL_REPO)
    place_in_hf_cache(metric_snapshot, cache, METRIC_REPO)
    yield cache
    shutil.rmtree(cache, ignore_errors=True)  # a copy of the 1.3 GB metric snapshot


@pytest.fixture(scope="module")
def pair(pair_cache) -> Predictor:
    locator = WeightLocator(hf_cache=pair_cache / "hub", offline=True)
    return Predictor.from_pretrained("da3-small-metric", device="cpu", locator=locator)


def test_the_catalog_names_both_repositories_and_licenses():
    info = lookup_model("da3-small-metric")
    assert info.repo_id == PAIR and lookup_model(PAIR) is info
    assert info.parts == (SMALL_REPO, METRIC_REPO) and info.license == "Apache-2.0"
    assert all(lookup_model(part).license == "Apache-2.0" for part in info.parts)
    assert info.metric and info.camera and info.sky and not info.gaussians
    assert lookup_model("da3-base-metric").parts[0] == "depth-anything/DA3-BASE"


def test_the_pair_equals_the_nested_alignment_of_its_two_networks(pair, small_snapshot,
                                                                  metric_snapshot):  # fmt: skip
    small = Predictor.from_pretrained(small_snapshot, device="cpu")
    metric = Predictor.from_pretrained(metric_snapshot, device="cpu")
    images = pair._prepare_request(PredictRequest(PHOTOS, process_res=RES)).batch
    with torch.no_grad():
        joined = pair.network(images)
        alone = small.network(images)
        metres = metric.network(images)
        oracle = align_to_metric(
            alone.depth, alone.confidence, alone.extrinsics, alone.intrinsics,
            metres.depth, metres.sky,
        )  # fmt: skip
    assert joined.is_metric
    torch.testing.assert_close(joined.depth, oracle.depth, rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(joined.extrinsics, oracle.extrinsics, rtol=TOLERANCE,
                               atol=TOLERANCE)  # fmt: skip
    torch.testing.assert_close(joined.sky, metres.sky)
    prediction = pair.predict(PHOTOS, process_res=RES)
    assert prediction.is_metric and prediction.units == "m" and prediction.sky is not None
    assert prediction.scale["source"] == "model"
    assert abs(prediction.scale["nested_scale"] / float(oracle.scale) - 1) < TOLERANCE


def test_a_pair_refuses_snapshots_of_other_networks(small_snapshot):
    with pytest.raises(CheckpointError, match="da3metric-large"):
        load_pair([small_snapshot, small_snapshot])


@pytest.fixture(scope="module")
def env(pair_cache, tmp_path_factory):
    import conftest

    env = conftest.service_env.__wrapped__(pair_cache, tmp_path_factory.mktemp("pair"))
    return {**env, "MODEL_ID": PAIR}


@pytest.mark.parametrize("transport", ["self_hosted", "runpod_local"])
def test_both_transports_answer_in_metres_from_the_pair(transport, env, pair, tmp_path):
    expected = pair.predict(PHOTOS, process_res=RES)
    starter = serve_process if transport == "self_hosted" else runpod_local_api
    with starter(env, tmp_path / "server.log") as started:
        url = started[0] if isinstance(started, tuple) else started
        with Client(url, api_key=TEST_API_KEY, timeout=600) as client:
            result = client.depth(PHOTOS, process_res=RES, outputs=["depth_npy"],
                                  model_id="da3-small-metric")  # fmt: skip
            if transport == "self_hosted":
                table = {m["model_id"]: m for m in client.models()}
    assert result.raw["model_id"] == PAIR and result.raw["units"] == "m"
    for view, depth in zip(result.views, expected.depth, strict=True):
        answer = np.load(io.BytesIO(base64.b64decode(view.raw["depth_npy"]["base64"])))
        np.testing.assert_allclose(answer, depth, rtol=TOLERANCE, atol=TOLERANCE)
    if transport == "self_hosted":
        parts = table[PAIR]["parts"]
        assert [(p["model_id"], p["license"]) for p in parts] == [
            (SMALL_REPO, "Apache-2.0"), (METRIC_REPO, "Apache-2.0")
        ]  # fmt: skip
