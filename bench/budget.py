"""The request budget: how fast an oversized request is refused, and what the largest requests
the default CPU budget admits cost.

    .venv/bin/python bench/budget.py [--preset da3-small] [--repeats 5] [--skip-largest]
    .venv/bin/python bench/budget.py --per-token --preset da3-large

1. Refusal: a request over the default CPU budget (an image header claiming 4000 x 4000 at
   process_res 2016, 20736 network tokens) sent to a `Service` in process and over HTTP to the
   self-hosted app (uvicorn in a thread, once its model is warm); median of --repeats.
2. Largest admitted: for the shared test photo (1208 x 680) the requests at the edge of the
   default CPU budget (one view at the largest process_res, the most views at 504, and two
   4000 x 4000 images at 504, the pixel budget's edge), each run through `Service.handle` with
   every output in a fresh process; wall seconds and peak RSS above the loaded, warm model.
3. --per-token: forward memory per network token of --preset (two sizes in fresh processes,
   the slope of peak RSS): where api/budget.py's GPU_BYTES_PER_TOKEN comes from.
Random weights: speed and memory, not accuracy.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from common import IMAGES, REPO, snapshot
from contract_cases import png_header_only
from da3_serverless.api.budget import CPU_BUDGET_PIXELS, CPU_BUDGET_TOKENS, estimate_cost
from da3_serverless.config import Settings
from da3_serverless.inference.preprocess import MAX_PROCESS_RES
from da3_serverless.server import create_app
from da3_serverless.service import Service
from servers import app_in_thread, wait_ready

KEY = "bench-key"
ALL_OUTPUTS = ["depth", "preview", "confidence", "sky_mask", "depth_npy", "pointcloud"]
OVERSIZED = {
    "api_key": KEY,
    "image_base64": base64.b64encode(png_header_only(4000, 4000)).decode(),
    "process_res": 2016,
}

CHILD = """
import json, resource, sys, time
from pathlib import Path
from da3_serverless.config import Settings
from da3_serverless.service import Service
folder, workspace, payload_path = sys.argv[1:4]
settings = Settings(model_id=folder, device="cpu", workspace=Path(workspace), api_key="bench-key",
                    hf_hub_offline=True)
service = Service(settings)
service.start()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
payload = json.loads(Path(payload_path).read_text())
start = time.perf_counter()
body = service.handle(payload)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "model_rss_mb": base, "peak_rss_mb": peak,
                  "stages_ms": body["timings_ms"], "budget": service.budget.describe()}))
"""

PER_TOKEN = """
import json, resource, sys
import numpy as np
from da3_serverless.inference.predictor import Predictor
predictor = Predictor.from_pretrained(sys.argv[1], device="cpu")
side = int(sys.argv[2])
pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
predictor.predict(pixels, process_res=side)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def settings_for(folder: Path, workspace: Path) -> Settings:
    return Settings(
        model_id=str(folder), device="cpu", workspace=workspace, api_key=KEY,
        hf_hub_offline=True,
    )  # fmt: skip


def refusal_times(folder: Path, repeats: int) -> dict[str, float]:
    """Median seconds to refuse OVERSIZED in process and over HTTP."""
    with tempfile.TemporaryDirectory() as workspace:
        service = Service(settings_for(folder, Path(workspace)))
        in_process = []
        for _ in range(repeats):
            start = time.perf_counter()
            try:
                service.handle(OVERSIZED)
            except Exception as error:  # the refusal is the point
                assert getattr(error, "code", None) == "request_too_large", error
            in_process.append(time.perf_counter() - start)
        over_http = []
        with app_in_thread(create_app(service.settings, service)) as url:
            wait_ready(url, None, None)  # timed on an idle server, not during the model load
            client = httpx.Client(timeout=60)  # one client: its set-up is not the server's time
            for _ in range(repeats):
                start = time.perf_counter()
                answer = client.post(f"{url}/runsync", json=OVERSIZED)
                over_http.append(time.perf_counter() - start)
                assert answer.status_code == 413, answer.text
    return {"in_process_s": statistics.median(in_process), "http_s": statistics.median(over_http)}


def edge_requests() -> list[tuple[str, dict]]:
    """Requests at the edge of the default CPU budget, described as views x size x process_res."""
    photo_path = IMAGES / "soh-000.png"
    photo = Image.open(photo_path)
    size = photo.size
    largest_res = max(
        res
        for res in range(14, MAX_PROCESS_RES + 1)
        if estimate_cost("m", res, [size]).tokens <= CPU_BUDGET_TOKENS
    )
    views_504 = max(
        n for n in range(1, 17) if estimate_cost("m", 504, [size] * n).tokens <= CPU_BUDGET_TOKENS
    )
    photo_b64 = base64.b64encode(photo_path.read_bytes()).decode()
    buffer = io.BytesIO()
    photo.convert("RGB").resize((4000, 4000)).save(buffer, "JPEG", quality=90)
    big_b64 = base64.b64encode(buffer.getvalue()).decode()
    assert CPU_BUDGET_PIXELS >= 2 * 4000 * 4000
    common = {"api_key": KEY, "outputs": ALL_OUTPUTS}
    w, h = size
    return [
        (f"1 x {w}x{h} x {largest_res}",
         {**common, "image_base64": photo_b64, "process_res": largest_res}),
        (f"{views_504} x {w}x{h} x 504",
         {**common, "images": [{"base64": photo_b64}] * views_504, "process_res": 504}),
        ("2 x 4000x4000 x 504", {**common, "images": [{"base64": big_b64}] * 2}),
    ]  # fmt: skip


def run_child(code: str, *args: str) -> dict:
    env_path = str(REPO / "src")
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def largest_admitted(folder: Path) -> None:
    for label, payload in edge_requests():
        cost = estimate_cost("m", payload.get("process_res", 504), sizes_of(payload))
        with tempfile.TemporaryDirectory() as workspace:
            payload_path = Path(workspace) / "payload.json"
            payload_path.write_text(json.dumps(payload))
            found = run_child(CHILD, str(folder), workspace, str(payload_path))
        print(
            f"{label:>24}: {cost.tokens:5d} tokens, {cost.pixels / 1e6:5.1f} MP, "
            f"{found['seconds']:6.1f} s, peak RSS {found['peak_rss_mb']:6.0f} MB "
            f"(+{found['peak_rss_mb'] - found['model_rss_mb']:.0f} MB over the warm model)"
        )
    print(f"budget: {found['budget']}")


def sizes_of(payload: dict) -> list[tuple[int, int]]:
    blobs = [v["base64"] for v in payload["images"]] if "images" in payload else [
        payload["image_base64"]
    ]  # fmt: skip
    return [Image.open(io.BytesIO(base64.b64decode(b))).size for b in blobs]


def per_token(folder: Path) -> None:
    low, high = 280, 504
    peaks = {
        side: run_child(PER_TOKEN, str(folder), str(side))["peak_rss_mb"] for side in (low, high)
    }
    tokens = {side: (side // 14) ** 2 for side in (low, high)}
    slope = (peaks[high] - peaks[low]) * 1024 / (tokens[high] - tokens[low])
    print(f"peak RSS {peaks[low]:.0f} MB at {tokens[low]} tokens, {peaks[high]:.0f} MB at "
          f"{tokens[high]} tokens: {slope:.0f} KiB per token (fp32, CPU)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="da3-small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-largest", action="store_true")
    parser.add_argument("--per-token", action="store_true")
    args = parser.parse_args()
    folder = snapshot(args.preset)
    if args.per_token:
        per_token(folder)
        return
    times = refusal_times(folder, args.repeats)
    print(f"refusing an oversized request: {times['in_process_s'] * 1000:.2f} ms in process, "
          f"{times['http_s'] * 1000:.1f} ms over HTTP (median of {args.repeats})")  # fmt: skip
    if not args.skip_largest:
        largest_admitted(folder)


if __name__ == "__main__":
    main()
