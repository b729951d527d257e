"""`da3-serverless batch` (`Client.map`) against the self-hosted server: throughput and the
fan-out's own cost per request.

    .venv/bin/python bench/batch.py [--preset da3-small] [--process-res 504] [--photos 24]
                                    [--rounds 3] [--concurrency 1 4 8]

A random-weight snapshot of `--preset` served by `da3-serverless serve` (a subprocess on
127.0.0.1, its defaults: batching on). `--photos` different 640 x 480 JPEG crops of the test
photos, sent with outputs depth and preview:

1. Overhead: per round (interleaved, so drift hits both alike), the photos sent one after
   another by a plain loop of `Client.depth` + `DepthResult.save_all` (what a hand-written
   script does), then by `Client.map` at concurrency 1 into a fresh folder (the same requests,
   plus the record, the whole-folder writes and the worker thread). The overhead per request is
   the difference of the medians over `--photos`.
2. Throughput: `Client.map` at each `--concurrency`, photos per second (median of `--rounds`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from PIL import Image

from common import IMAGES, REPO, snapshot
from da3_serverless.client import Client
from servers import free_port, serve_command, wait_ready

OUTPUTS = ["depth", "preview"]


def write_photos(folder: Path, count: int) -> list[Path]:
    """`count` different 640 x 480 JPEG crops of the two test photos."""
    folder.mkdir(parents=True)
    sources = [Image.open(IMAGES / name).convert("RGB") for name in ("soh-000.png", "soh-010.png")]
    paths = []
    for index in range(count):
        x, y = 23 * index % 560, 7 * index % 200
        path = folder / f"photo-{index:03d}.jpg"
        sources[index % 2].crop((x, y, x + 640, y + 480)).save(path, quality=90)
        paths.append(path)
    return paths


def start_server(snapshot_folder: Path, workspace: Path) -> tuple[str, subprocess.Popen]:
    env = {
        **os.environ, "PYTHONPATH": str(REPO / "src"), "MODEL_ID": str(snapshot_folder),
        "WORKSPACE": str(workspace), "DA3_ALLOW_UNAUTHENTICATED": "1", "MAX_QUEUE": "64",
        "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    port = free_port()
    log_path = workspace / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            serve_command("serve", "--host", "127.0.0.1", "--port", str(port)),
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, server, log_path)
    return url, server


def loop_seconds(client: Client, photos: list[Path], res: int, out: Path) -> float:
    """A plain loop of `Client.depth` + `save_all`, one photo after another."""
    start = time.perf_counter()
    for photo in photos:
        result = client.depth(photo, process_res=res, outputs=OUTPUTS)
        result.save_all(out, photo.stem)
    return time.perf_counter() - start


def map_seconds(client: Client, folder: Path, res: int, out: Path, concurrency: int) -> float:
    start = time.perf_counter()
    report = client.map(folder, out, concurrency=concurrency, process_res=res, outputs=OUTPUTS)
    elapsed = time.perf_counter() - start
    assert not report.failures and not report.left, report.summary()
    return elapsed


def measure(url: str, photo_folder: Path, photos: list[Path], args, scratch: Path) -> dict:
    """The interleaved overhead rounds, then the throughput at each concurrency."""
    fresh = iter(range(1_000_000))

    def folder() -> Path:
        return scratch / f"out-{next(fresh)}"

    with Client(url, timeout=600, max_retries=8) as client:
        client.depth(photos[0], process_res=args.process_res, outputs=OUTPUTS)  # warm-up
        loops, maps = [], []
        for _ in range(args.rounds):
            loops.append(loop_seconds(client, photos, args.process_res, folder()))
            maps.append(map_seconds(client, photo_folder, args.process_res, folder(), 1))
        throughput = {}
        for concurrency in args.concurrency:
            times = [map_seconds(client, photo_folder, args.process_res, folder(), concurrency)
                     for _ in range(args.rounds)]  # fmt: skip
            throughput[concurrency] = round(len(photos) / statistics.median(times), 3)
    loop_s, map_s = statistics.median(loops), statistics.median(maps)
    return {
        "loop_seconds_per_request": round(loop_s / len(photos), 4),
        "map_c1_seconds_per_request": round(map_s / len(photos), 4),
        "overhead_ms_per_request": round((map_s - loop_s) / len(photos) * 1000, 2),
        "photos_per_second_by_concurrency": throughput,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="da3-small")
    parser.add_argument("--process-res", type=int, default=504)
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    folder = snapshot(args.preset)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as temporary:
        scratch = Path(temporary)
        photos = write_photos(scratch / "photos", args.photos)
        (scratch / "workspace").mkdir()
        url, server = start_server(folder, scratch / "workspace")
        try:
            results = measure(url, scratch / "photos", photos, args, scratch)
        finally:
            server.terminate()
            server.wait(60)
            shutil.rmtree(scratch / "workspace", ignore_errors=True)
    setup = {"preset": args.preset, "process_res": args.process_res, "photos": args.photos,
             "cpus": os.cpu_count(), "load_average": [load_before, os.getloadavg()]}  # fmt: skip
    print(json.dumps({**setup, **results}, indent=2))


if __name__ == "__main__":
    main()
