"""`da3-serverless batch` (`Client.map`) against the self-hosted server: throughput and the
fan-out's own cost per request.

    .venv/bin/python bench/batch.py [--preset da3-small] [--process-res 504] [--photos 24]
                                    [--photo-size 640 480] [--rounds 3] [--concurrency 1 4 8]
                                    [--replay-rounds 7] [--skip-overhead]

A random-weight snapshot of `--preset` served by `da3-serverless serve` (a subprocess on
127.0.0.1, its defaults: batching on). `--photos` different JPEG crops of the test photos
(`--photo-size`, 640 x 480 by default), sent with outputs depth and preview:

1. Overhead: per round (interleaved, so drift hits both alike), the photos sent one after
   another by a plain loop of `Client.depth` + `DepthResult.save_all` (what a hand-written
   script does), then by `Client.map` at concurrency 1 into a fresh folder (the same requests,
   plus the record, the whole-folder writes and the worker thread). The overhead per request is
   the difference of the medians over `--photos`. Measured twice: against a replay endpoint
   on 127.0.0.1 that answers every request at once with the server's real answer to the first
   photo (the fan-out's own cost, out of the model's noise; `--replay-rounds`), and against
   the server itself (skipped with `--skip-overhead`).
2. Throughput: `Client.map` at each `--concurrency`, photos per second (median of `--rounds`).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from common import IMAGES, snapshot, start_server
from da3_serverless.client import Client

OUTPUTS = ["depth", "preview"]


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """`count` different JPEG crops of the two test photos, each `size` (at most 1200 x 600)."""
    folder.mkdir(parents=True)
    sources = [Image.open(IMAGES / name).convert("RGB") for name in ("soh-000.png", "soh-010.png")]
    paths = []
    for index in range(count):
        x, y = 23 * index % (1208 - size[0]), 7 * index % (680 - size[1])
        path = folder / f"photo-{index:03d}.jpg"
        sources[index % 2].crop((x, y, x + size[0], y + size[1])).save(path, quality=90)
        paths.append(path)
    return paths


@contextmanager
def replay_endpoint(answer: dict) -> Iterator[str]:
    """A local endpoint answering every POST with `answer` (a completed job) at once."""
    body = json.dumps({"id": "replay", "status": "COMPLETED", "output": answer}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real server

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def overhead(url: str, photo_folder: Path, photos: list[Path], res: int, rounds: int,
             new_folder) -> dict:  # fmt: skip
    """Interleaved rounds of the plain loop and `Client.map` at concurrency 1."""
    loops, maps = [], []
    with Client(url, timeout=600, max_retries=8) as client:
        for _ in range(rounds):
            loops.append(loop_seconds(client, photos, res, new_folder()))
            maps.append(map_seconds(client, photo_folder, res, new_folder(), 1))
    loop_s, map_s = statistics.median(loops), statistics.median(maps)
    return {
        "loop_ms_per_request": round(loop_s / len(photos) * 1000, 2),
        "map_c1_ms_per_request": round(map_s / len(photos) * 1000, 2),
        "overhead_ms_per_request": round((map_s - loop_s) / len(photos) * 1000, 2),
        "rounds_s": {"loop": [round(t, 3) for t in loops], "map": [round(t, 3) for t in maps]},
    }


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

    results: dict = {}
    with Client(url, timeout=600, max_retries=8) as client:
        first = client.depth(photos[0], process_res=args.process_res, outputs=OUTPUTS)  # warm-up
    with replay_endpoint(first.raw) as replay:
        results["overhead_against_replay"] = overhead(
            replay, photo_folder, photos, args.process_res, args.replay_rounds, folder
        )
    if not args.skip_overhead:
        results["overhead_against_server"] = overhead(
            url, photo_folder, photos, args.process_res, args.rounds, folder
        )
    with Client(url, timeout=600, max_retries=8) as client:
        throughput = {}
        for concurrency in args.concurrency:
            times = [map_seconds(client, photo_folder, args.process_res, folder(), concurrency)
                     for _ in range(args.rounds)]  # fmt: skip
            throughput[concurrency] = round(len(photos) / statistics.median(times), 3)
    results["photos_per_second_by_concurrency"] = throughput
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="da3-small")
    parser.add_argument("--process-res", type=int, default=504)
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--photo-size", type=int, nargs=2, default=[640, 480])
    parser.add_argument("--replay-rounds", type=int, default=7)
    parser.add_argument("--skip-overhead", action="store_true",
                        help="no overhead rounds on the server (the replay ones run)")  # fmt: skip
    args = parser.parse_args()
    folder = snapshot(args.preset)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as temporary:
        scratch = Path(temporary)
        photos = write_photos(scratch / "photos", args.photos, tuple(args.photo_size))
        (scratch / "workspace").mkdir()
        try:
            with start_server(folder, scratch / "workspace") as url:
                results = measure(url, scratch / "photos", photos, args, scratch)
        finally:
            shutil.rmtree(scratch / "workspace", ignore_errors=True)
    setup = {"preset": args.preset, "process_res": args.process_res, "photos": args.photos,
             "photo_size": args.photo_size,
             "cpus": os.cpu_count(), "load_average": [load_before, os.getloadavg()]}  # fmt: skip
    print(json.dumps({**setup, **results}, indent=2))


if __name__ == "__main__":
    main()
