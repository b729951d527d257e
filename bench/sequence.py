"""Sequences on CPU: frames per second of a video through the chunked path with a
random-weight da3-small at process_res 280, the share of forwarded frames that re-compute
overlaps, the alignment's time per chunk, and peak memory against video length.

    PYTHONPATH=src nice -n 10 .venv/bin/python bench/sequence.py [--seconds 10] [--fps 5]
    PYTHONPATH=src nice -n 10 .venv/bin/python bench/sequence.py --memory

The video is a synthetic 30 fps pan across tests/data/images/soh-000.png (640 x 360, H.264),
sampled at `--fps`, in chunks of `--chunk-size` overlapping by half. `--memory` runs 10, 30 and
60 s videos (320 x 240, sampled at 10 fps, chunks of 20 overlapping by 5) through the stand-in
network of the tests, asking for `trajectory`, `depth_frames` and `depth_video` as paths, and
reports tracemalloc's peak (Python and numpy allocations; FFmpeg's buffers are not traced)
beside the size of those output files (placed from disk, never read into memory). Prints JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from common import snapshot
from da3_serverless.api.budget import Budget
from da3_serverless.api.schema import parse_request
from da3_serverless.api.storage import OutputStore
from da3_serverless.config import Settings
from da3_serverless.inference.cancel import CancelToken
from da3_serverless.inference.predictor import Predictor
from da3_serverless.sequence.pipeline import SequenceContext, run_sequence
from sequence_standin import standin_context
from videos import constant_rate, make_video


def _request(video: bytes, settings: Settings, **fields) -> object:
    payload = {"video_base64": base64.b64encode(video).decode(), "output_metric": False,
               "outputs": ["trajectory", "depth_frames"], **fields}  # fmt: skip
    return parse_request(payload, settings)


def speed(args: argparse.Namespace, settings: Settings) -> dict:
    video = make_video(constant_rate(args.seconds, 30), width=640, height=360)
    predictor = Predictor.from_pretrained(str(snapshot("da3-small")), device="cpu")
    context = SequenceContext(
        settings, OutputStore(settings), Budget(10**12, 10**12), predictor.model_id,
        lambda pinned: predictor, CancelToken(),
    )  # fmt: skip
    request = _request(video, settings, fps=args.fps, chunk_size=args.chunk_size,
                       overlap=args.chunk_size // 2, process_res=280)  # fmt: skip
    started = time.perf_counter()
    response = run_sequence(context, request)
    seconds = time.perf_counter() - started
    chunks = response["sequence"]["chunks"]
    frames = response["sequence"]["frames"]
    forwarded = sum(chunk["stop"] - chunk["start"] for chunk in chunks)
    return {
        "frames": frames, "chunks": len(chunks), "seconds": round(seconds, 2),
        "frames_per_s": round(frames / seconds, 3),
        "overlap_share": round((forwarded - frames) / forwarded, 3),
        "align_ms_median": statistics.median(c["align_ms"] for c in chunks[1:] or [chunks[0]]),
        "scales": [round(c["scale"], 4) for c in chunks],
    }  # fmt: skip


MEMORY_OUTPUTS = ["trajectory", "depth_frames", "depth_video"]


def memory(settings: Settings) -> dict:
    peaks = {}
    for seconds in (10, 30, 60):
        video = make_video(constant_rate(seconds, 30), width=320, height=240)
        request = _request(video, settings, fps=10, chunk_size=20, overlap=5,
                           outputs=MEMORY_OUTPUTS, return_base64=False)  # fmt: skip
        del video
        tracemalloc.start()
        response = run_sequence(standin_context(settings), request)
        peaks[f"{seconds}s_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
        tracemalloc.stop()
        files = sum(Path(response[name]["path"]).stat().st_size for name in MEMORY_OUTPUTS)
        peaks[f"{seconds}s_output_files_mib"] = round(files / 2**20, 2)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--fps", type=float, default=5)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--memory", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workspace:
        settings = Settings(workspace=Path(workspace), max_response_bytes=10**9)
        result = memory(settings) if args.memory else speed(args, settings)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
