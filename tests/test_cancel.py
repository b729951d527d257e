"""Cancellation, layer by layer: the token, the network (between blocks and slices), the
predictor, the service (nothing written, memory freed, still serving) and the RunPod worker,
whose job RunPod's own `JobScaler` stops the way it does on RunPod (cancelling the handler's
task). A job is cancelled from inside the forward, by a hook on a block, so the moment is
exact rather than timed."""

from __future__ import annotations

import asyncio
import base64
import gc
import threading
import weakref

import pytest
import torch

from conftest import SMALL_REPO, offline_settings
from da3_serverless.api.errors import ServiceError
from da3_serverless.inference.cancel import Cancelled, CancelToken
from da3_serverless.model import layers
from da3_serverless.model.presets import build_network
from da3_serverless.runpod_worker import make_handler
from da3_serverless.service import Service
from paths import IMAGES
from runpod_scaler import stop_one_job

PHOTO = base64.b64encode((IMAGES / "soh-000.png").read_bytes()).decode()
OTHER = base64.b64encode((IMAGES / "soh-010.png").read_bytes()).decode()


def test_token():
    token = CancelToken()
    token.check()
    assert token.cancel("asked by the test") and token.cancelled
    with pytest.raises(Cancelled, match="asked by the test"):
        token.check()
    with pytest.raises(Cancelled):
        token.commit()
    late = CancelToken()
    late.commit()  # past the last check: too late to cancel, the job completes
    assert not late.cancel() and not late.cancelled
    late.check()


@pytest.mark.parametrize("batch, length", [(2, 300), (6, 50)], ids=["queries", "entries"])
def test_a_block_in_slices_equals_the_block(monkeypatch, batch, length):
    torch.manual_seed(0)
    block = layers.Block(96, 4, qk_norm=True).eval()
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    tokens = torch.randn(batch, length, 96)
    rope = layers.rope_angles(torch.randint(0, 20, (length, 2)), 24)
    # Many slices at this small size: attention in slices of queries, or of batch entries.
    monkeypatch.setattr(layers, "SLICE_FLOP", 5e6)
    monkeypatch.setattr(layers, "MIN_QUERY_SLICE", 64)
    assert len(layers._attention_slices(batch, length, 96)) > 1
    calls = []
    with torch.inference_mode():
        whole = block(tokens, rope)
        sliced = block(tokens, rope, check=lambda: calls.append(1))
    assert len(calls) > 10
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)


def cancel(token: CancelToken, reason: str | None = None) -> None:
    """For a forward pre-hook (whose return value would replace the block's input)."""
    token.cancel(reason)


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_network("da3-small").eval()


def test_the_network_stops_inside_the_block_it_was_cancelled_in(network):
    views = torch.randn(1, 3, 3, 112, 154)
    with torch.inference_mode():
        plain = network(views)
        checked = network(views, check=lambda: None)
    torch.testing.assert_close(checked.depth, plain.depth, rtol=1e-4, atol=1e-5)

    token, entered = CancelToken(), []
    blocks = network.backbone.pretrained.blocks
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: entered.append(i)) for i, b in
             enumerate(blocks)]  # fmt: skip
    hooks.append(blocks[4].register_forward_pre_hook(lambda m, a: cancel(token)))
    hooks.append(network.head.register_forward_pre_hook(lambda m, a: entered.append("head")))
    try:
        with torch.inference_mode(), pytest.raises(Cancelled):
            network(views, check=token.check)
    finally:
        for hook in hooks:
            hook.remove()
    assert entered == [0, 1, 2, 3, 4]  # block 4 stopped at its first slice; no head


@pytest.fixture(scope="module")
def service(hf_cache, tmp_path_factory) -> Service:
    workspace = tmp_path_factory.mktemp("workspace")
    settings = offline_settings(
        hf_cache, workspace, api_key=None, allow_unauthenticated=True, warmup=False
    )
    service = Service(settings)
    service.start()
    return service


def request(**fields) -> dict:
    return {"images": [{"base64": PHOTO}, {"base64": OTHER}], "process_res": 140, **fields}


def cancel_in_block(service: Service, token: CancelToken, index: int = 2):
    """Cancel `token` as block `index` starts; returns (hook handles, weak refs to the outputs
    of block 0, which live only as long as the forward holds them)."""
    network = service.model_cache.get(SMALL_REPO).network
    blocks = network.backbone.pretrained.blocks
    kept: list[weakref.ref] = []
    return [
        blocks[index].register_forward_pre_hook(lambda m, a: cancel(token, "cancelled by test")),
        blocks[0].register_forward_hook(lambda m, a, out: kept.append(weakref.ref(out))),
    ], kept


def test_the_predictor_raises_cancelled(service):
    predictor = service.model_cache.get(SMALL_REPO)
    cancelled = CancelToken()
    cancelled.cancel()
    with pytest.raises(Cancelled):
        predictor.predict(IMAGES / "soh-000.png", process_res=140, cancel=cancelled)
    token = CancelToken()
    hooks, _ = cancel_in_block(service, token)
    try:
        with pytest.raises(Cancelled, match="cancelled by test"):
            predictor.predict(IMAGES / "soh-000.png", process_res=140, cancel=token)
    finally:
        for hook in hooks:
            hook.remove()


def test_a_cancelled_request_frees_its_tensors_writes_nothing_and_the_service_serves_on(service):
    token = CancelToken()
    hooks, kept = cancel_in_block(service, token)
    try:
        with pytest.raises(ServiceError) as stopped:
            service.handle(request(outputs=["depth", "depth_npy"]), cancel=token)
    finally:
        for hook in hooks:
            hook.remove()
    assert stopped.value.code == "cancelled" and stopped.value.status == 499
    assert "cancelled by test" in stopped.value.message
    gc.collect()
    assert kept and all(ref() is None for ref in kept)  # even while we hold the error
    output_dir = service.settings.output_dir
    assert not output_dir.exists() or not any(output_dir.iterdir())
    body = service.handle(request())
    assert len(body["views"]) == 2 and all(view["file_path"] for view in body["views"])
    service.discard(body)  # what a job cancelled too late does with its result
    assert not any(output_dir.iterdir())


def test_cancelled_before_decoding(service):
    token = CancelToken()
    token.cancel("cancelled while queued")
    with pytest.raises(ServiceError, match="cancelled while queued") as stopped:
        service.handle(request(), cancel=token)
    assert stopped.value.code == "cancelled"
    assert "decode" not in str(stopped.value.message)


def test_runpod_handler_is_async_and_serves(service):
    handler = make_handler(service)
    answer = asyncio.run(handler({"id": "job-ok", "input": request(process_res=70)}))
    assert answer["schema_version"] == "1" and len(answer["views"]) == 2
    failed = asyncio.run(handler({"id": "job-bad", "input": {"image_base64": "%%%"}}))
    assert '"code": "invalid_input"' in failed["error"]
    service.discard(answer)


def test_runpods_stop_signal_stops_the_computation(service):
    """RunPod's JobScaler takes one job, a stop signal for it arrives while the network runs
    (block 2 starts), and the scaler cancels the handler's task: the computation stops before
    the head, the task ends once the thread is free, and nothing is written or reported."""
    network = service.model_cache.get(SMALL_REPO).network
    in_network, head_ran = threading.Event(), []
    hooks = [
        network.backbone.pretrained.blocks[2].register_forward_pre_hook(
            lambda m, a: in_network.set()
        ),
        network.head.register_forward_pre_hook(lambda m, a: head_ran.append(True)),
    ]
    job = {"id": "job-stopped", "input": request(process_res=504)}
    try:
        reported, timings = stop_one_job(make_handler(service), job, in_network)
    finally:
        for hook in hooks:
            hook.remove()
    assert reported == [] and head_ran == []
    print(f"stop signal to free worker: {timings['free'] - timings['stopped']:.3f} s")
    output_dir = service.settings.output_dir
    assert not output_dir.exists() or not any(output_dir.iterdir())
    answer = asyncio.run(make_handler(service)({"id": "after", "input": request()}))
    assert answer["schema_version"] == "1"
    service.discard(answer)
