"""Batching unrelated photos: what one shared forward buys, on this machine.

    .venv/bin/python bench/batching.py [--preset da3-small] [--process-res 504] [--rounds 3]
                                       [--runs 3] [--skip-server]

Eight different photos of one network size (tests/batch_photos.py: crops, resizes, one with an
EXIF rotation), random-weight snapshot of `--preset`, fp32 on the CPU (CUDA when there is one):

1. The network alone: one forward of a batch of 8 against 8 forwards of one, interleaved,
   medians of `--runs`; and `Predictor.predict_batch` of the 8 against 8 `predict` calls
   (pre- and post-processing included).
2. Through the real self-hosted server (`da3-serverless serve`, a subprocess on 127.0.0.1):
   photos per second with 8 concurrent clients, each sending its photo `--rounds` times in a
   closed loop, with batching on (MAX_BATCH=8, BATCH_WAIT_MS=10) and off (MAX_BATCH=1); and
   the batch sizes the server's log shows.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

from common import interleaved_medians, snapshot, start_server
from da3_serverless.inference.predictor import Predictor, PredictRequest
from da3_serverless.inference.preprocess import load_rgb, processing_size, to_network_input

CLIENTS = 8


def forwards(predictor: Predictor, photos: list[Path], res: int, runs: int) -> dict:
    """Batch of 8 against 8 singles: the network alone, then the whole predictor."""
    views = [load_rgb(photo)[0] for photo in photos]
    size = processing_size(*views[0].size, res)
    batch = torch.cat([to_network_input([view], size) for view in views]).to(predictor.device)
    network = predictor.network

    def batched() -> None:
        network(batch)

    def singles() -> None:
        for sample in batch.split(1):
            network(sample)

    requests = [PredictRequest(photo, process_res=res) for photo in photos]
    with torch.inference_mode():
        medians = interleaved_medians(
            {
                "forward_batch_of_8": batched,
                "forward_8_singles": singles,
                "predict_batch_of_8": lambda: predictor.predict_batch(requests),
                "predict_8_singles": lambda: [
                    predictor.predict(p, process_res=res) for p in photos
                ],
            },
            runs=runs,
        )
    summary = {name: round(seconds, 3) for name, seconds in medians.items()}
    summary["network_input"] = list(size)
    summary["forward_speedup"] = round(
        medians["forward_8_singles"] / medians["forward_batch_of_8"], 3
    )
    summary["predict_speedup"] = round(
        medians["predict_8_singles"] / medians["predict_batch_of_8"], 3
    )
    return summary


def server_throughput(folder: Path, photos: list[Path], res: int, rounds: int, max_batch: int):
    """Photos per second of 8 closed-loop clients against `da3-serverless serve`."""
    bodies = [
        {"image_base64": base64.b64encode(p.read_bytes()).decode(), "process_res": res}
        for p in photos
    ]
    with tempfile.TemporaryDirectory() as workspace:
        settings = {"MAX_BATCH": str(max_batch), "BATCH_WAIT_MS": "10"}
        with start_server(folder, Path(workspace), **settings) as url:

            def client(body: dict) -> None:
                with httpx.Client(timeout=600) as http:
                    for _ in range(rounds):
                        answer = http.post(f"{url}/runsync", json=body)
                        assert answer.status_code == 200, answer.text

            client(bodies[0])  # warm-up, not timed
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
                list(pool.map(client, bodies))
            elapsed = time.perf_counter() - start
        sizes = Counter(
            json.loads(line)["batch"]
            for line in (Path(workspace) / "serve.log").read_text().splitlines()
            if line.startswith("{") and json.loads(line).get("msg") == "batch formed"
        )
    photos_done = CLIENTS * rounds
    return {
        "max_batch": max_batch,
        "photos": photos_done,
        "seconds": round(elapsed, 2),
        "photos_per_second": round(photos_done / elapsed, 3),
        "batch_sizes": dict(sorted(sizes.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="da3-small")
    parser.add_argument("--process-res", type=int, default=504)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-server", action="store_true", help="only part 1, the forwards")
    args = parser.parse_args()
    from batch_photos import write_batch_photos  # in tests/, on the path once common is in

    folder = snapshot(args.preset)
    predictor = Predictor.from_pretrained(folder, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as scratch:
        photos = write_batch_photos(Path(scratch))
        summary = {
            "preset": args.preset,
            "process_res": args.process_res,
            "device": str(predictor.device),
            "threads": torch.get_num_threads(),
            "forwards": forwards(predictor, photos, args.process_res, args.runs),
        }
        del predictor
        if not args.skip_server:
            on = server_throughput(folder, photos, args.process_res, args.rounds, max_batch=8)
            off = server_throughput(folder, photos, args.process_res, args.rounds, max_batch=1)
            summary["server_8_clients"] = {
                "batching_on": on,
                "batching_off": off,
                "speedup": round(on["photos_per_second"] / off["photos_per_second"], 3),
            }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
