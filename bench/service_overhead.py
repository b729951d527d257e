"""Cost of everything around the network, da3-small on CPU at process_res 504.

    .venv/bin/python bench/service_overhead.py [--requests 10]

1. In process, `Service.handle` on soh-000.png (1208x680) and on the same photo upscaled to
   4096x4096: each stage's time (decode, resize + inference, PNG16 encode, base64, save) and the
   share of the request that is not the network's forward pass.
2. Sequential throughput through RunPod's local API server (a subprocess on 127.0.0.1) against
   calling the Predictor directly (decoding the same photo from disk), same process_res, the
   two interleaved one call at a time; medians.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from common import IMAGES, REPO, interleaved_medians, snapshot
from da3_serverless.config import Settings
from da3_serverless.exports.encoding import encode_depth_png16
from da3_serverless.inference.predictor import Predictor
from da3_serverless.service import Service

RES = 504


def photo_base64(size: tuple[int, int] | None) -> str:
    image = Image.open(IMAGES / "soh-000.png").convert("RGB")
    if size is not None:
        image = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def network_seconds(predictor: Predictor, size: tuple[int, int]) -> float:
    """The forward pass alone, on the network-resolution input of an image of `size`."""
    from da3_serverless.inference.preprocess import processing_size

    width, height = processing_size(*size, RES)
    batch = torch.zeros(1, 1, 3, height, width)
    with torch.inference_mode():
        predictor.network(batch)
        start = time.perf_counter()
        predictor.network(batch)
        return time.perf_counter() - start


def in_process(folder: Path, workspace: Path, runs: int) -> dict:
    settings = Settings(
        model_id=str(folder), workspace=workspace, allow_unauthenticated=True, device="cpu"
    )
    service = Service(settings)
    service.start()
    predictor = service.model_cache.get(str(folder))
    results = {}
    for label, size in (("1208x680", None), ("4096x4096", (4096, 4096))):
        payload = {"image_base64": photo_base64(size), "process_res": RES}
        timings = [service.handle(payload)["timings_ms"] for _ in range(runs)]
        median = {k: round(statistics.median(t[k] for t in timings), 1) for k in timings[0]}
        forward_ms = network_seconds(predictor, size or (1208, 680)) * 1000
        results[label] = {
            "median_stage_ms": median,
            "network_forward_ms": round(forward_ms, 1),
            "overhead_share": round(1 - forward_ms / median["total"], 3),
        }
    depth = torch.rand(4096, 4096).numpy() * 50
    start = time.perf_counter()
    encode_depth_png16(depth)
    results["encode_png16_4096x4096_s"] = round(time.perf_counter() - start, 3)
    return results


def through_local_api(folder: Path, workspace: Path, requests: int) -> dict:
    port = 18000 + os.getpid() % 1000
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "MODEL_ID": str(folder),
        "WORKSPACE": str(workspace),
        "DA3_ALLOW_UNAUTHENTICATED": "1",
        "DA3_DEVICE": "cpu",
    }
    command = [sys.executable, "-m", "da3_serverless.runpod_worker", "--rp_serve_api",
               "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)]  # fmt: skip
    worker = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        body = {"input": {"image_base64": photo_base64(None), "process_res": RES}}
        predictor = Predictor.from_pretrained(folder, device="cpu")
        photo = IMAGES / "soh-000.png"
        client = httpx.Client(timeout=600)

        def api_request() -> None:
            answer = client.post(f"{url}/runsync", json=body).json()
            assert answer["status"] == "COMPLETED", answer

        # Interleaved, one at a time: the idle side never competes for the 2 cores, and
        # drift in machine speed hits both alike.
        medians = interleaved_medians(
            {
                "api": api_request,
                "direct": lambda: predictor.predict(photo, process_res=RES),
            },
            runs=requests,
        )
    finally:
        worker.terminate()
        worker.wait(60)
    return {
        "requests": requests,
        "local_api_s_per_request": round(medians["api"], 3),
        "predictor_s_per_call": round(medians["direct"], 3),
        "overhead": round(medians["api"] / medians["direct"] - 1, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = snapshot("da3-small")
    with tempfile.TemporaryDirectory() as workspace:
        summary = {
            "in_process": in_process(folder, Path(workspace), args.runs),
            "throughput": through_local_api(folder, Path(workspace), args.requests),
        }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
