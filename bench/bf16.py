"""bf16 weights against fp32 on CPU: the depth error of every preset, and load time and memory
of one.

    .venv/bin/python bench/bf16.py [--presets da3-small ...] [--process-res 504]
                                   [--load-preset da3-large] [--repeats 3]

Error: for each preset (default: all seven) the same random-weight snapshot is loaded with
fp32 weights and with bf16 weights (the backbone's matrices in bf16, the rest fp32, under bf16
autocast: `Predictor.from_pretrained(..., dtype=torch.bfloat16)`), soh-000.png and soh-010.png
are predicted as two views of one scene (one view for the single-view presets), and the
per-pixel depth relative error |bf16 - fp32| / fp32 is reported as p99 and max, with both
latencies; for models with a sky head also the share of pixels whose sky decision flips (they
get a filled-in far depth, so their error is a jump, not rounding) and the error elsewhere.
One predictor is in memory at a time.

Load: for `--load-preset`, each dtype in a fresh process (median of --repeats): seconds in
`from_pretrained` with the page cache warm and in the first prediction (soh-000.png at
process_res 504) after it, the weights' bytes, and memory above the process's after its
imports, once loaded and after predicting: anonymous and file-backed resident memory (fp32
tensors on CPU stay mapped from the safetensors file, so they count as file-backed page cache
until converted) and the peak RSS (Linux: RssAnon, RssFile, VmHWM reset through clear_refs).
Prints a JSON summary. Random weights: these are the numerics of bf16 on these networks, not
of the trained checkpoints.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from common import IMAGES, REPO, snapshot
from da3_serverless.inference.catalog import lookup_model
from da3_serverless.inference.predictor import Predictor
from da3_serverless.model.alignment import SKY_THRESHOLD
from da3_serverless.model.presets import PRESETS

PHOTOS = [IMAGES / "soh-000.png", IMAGES / "soh-010.png"]

LOAD = """
import json, sys, time
from pathlib import Path
import torch
from da3_serverless.inference.predictor import Predictor
def status_mib(field):  # a field of /proc/self/status, in MiB
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
def memory(stage):
    return {f"{stage}_anon_mib": status_mib("RssAnon") - base["anon"],
            f"{stage}_file_mib": status_mib("RssFile") - base["file"],
            f"{stage}_peak_mib": status_mib("VmHWM") - base["rss"]}
def reset_peak():  # VmHWM back to the current RSS
    Path("/proc/self/clear_refs").write_text("5")
reset_peak()
base = {"anon": status_mib("RssAnon"), "file": status_mib("RssFile"), "rss": status_mib("VmRSS")}
start = time.perf_counter()
predictor = Predictor.from_pretrained(sys.argv[1], device="cpu", dtype=getattr(torch, sys.argv[2]))
figures = {"load_s": time.perf_counter() - start, **memory("loaded")}
figures["weights_mib"] = sum(
    t.numel() * t.element_size() for t in predictor.network.state_dict().values()
) / 2**20
start = time.perf_counter()
predictor.predict(sys.argv[3], process_res=504, focal_length_px=1000.0)
figures.update(first_predict_s=time.perf_counter() - start, **memory("predicted"))
print(json.dumps(figures))
"""


def predict(folder, dtype: torch.dtype, views: list, process_res: int):
    predictor = Predictor.from_pretrained(folder, device="cpu", dtype=dtype)
    predictor.predict(views, process_res=140, focal_length_px=1000.0)  # warm-up
    start = time.perf_counter()
    prediction = predictor.predict(views, process_res=process_res, focal_length_px=1000.0)
    return prediction, time.perf_counter() - start


def error_of(preset: str, process_res: int) -> dict:
    folder = snapshot(preset)
    views = PHOTOS if lookup_model(preset).camera else PHOTOS[:1]
    exact, fp32_s = predict(folder, torch.float32, views, process_res)
    gc.collect()
    low, bf16_s = predict(folder, torch.bfloat16, views, process_res)
    gc.collect()
    relative = np.abs(low.depth - exact.depth) / np.abs(exact.depth)
    figures = {
        "preset": preset,
        "views": len(views),
        "depth_rel_error_p99": float(np.percentile(relative, 99)),
        "depth_rel_error_max": float(relative.max()),
        "depth_rel_error_median": float(np.median(relative)),
        "fp32_s": round(fp32_s, 2),
        "bf16_s": round(bf16_s, 2),
    }
    if exact.sky is not None:
        # Sky pixels get a filled-in far depth: a pixel whose sky probability crosses the
        # threshold between fp32 and bf16 jumps, which is a decision flip, not rounding error.
        agree = (exact.sky >= SKY_THRESHOLD) == (low.sky >= SKY_THRESHOLD)
        figures["sky_flipped_fraction"] = float(1 - agree.mean())
        figures["depth_rel_error_p99_sky_agreeing"] = float(np.percentile(relative[agree], 99))
        figures["depth_rel_error_max_sky_agreeing"] = float(relative[agree].max())
    return figures


def load_figures(preset: str, repeats: int) -> dict:
    folder = snapshot(preset)
    with (folder / "model.safetensors").open("rb") as file:  # warm the page cache
        while file.read(64 * 2**20):
            pass
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    figures = {}
    for dtype in ("float32", "bfloat16"):
        runs = []
        for _ in range(repeats):
            done = subprocess.run(
                [sys.executable, "-c", LOAD, str(folder), dtype, str(PHOTOS[0])],
                capture_output=True, text=True, check=True,
                env=env,
            )  # fmt: skip
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        figures[dtype] = {
            key: round(statistics.median(run[key] for run in runs), 2) for key in runs[0]
        }
    figures["bf16_over_fp32"] = {
        key: round(figures["bfloat16"][key] / figures["float32"][key], 3)
        for key in runs[0]
        if figures["float32"][key] > 0
    }
    return {"preset": preset, "repeats": repeats, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--process-res", type=int, default=504)
    parser.add_argument("--load-preset", default="da3-large", help="'none' skips the load part")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    summary = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "process_res": args.process_res,
        "error": [],
    }
    for preset in args.presets:
        summary["error"].append(error_of(preset, args.process_res))
        print(json.dumps(summary["error"][-1]), file=sys.stderr, flush=True)
    if args.load_preset != "none":
        summary["load"] = load_figures(args.load_preset, args.repeats)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
