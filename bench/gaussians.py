"""3D Gaussians of a random-weight DA3-GIANT on CPU: the Gaussian branch's share of a forward,
and the time and size of the `gaussians_ply` export, for 4 views at process_res 504.

    PYTHONPATH=src nice -n 10 .venv/bin/python bench/gaussians.py [--views 4] [--res 504]
    PYTHONPATH=src nice -n 10 .venv/bin/python bench/gaussians.py --memory --preset da3-small

The views are soh-000.png, soh-010.png and their mirror images (repeated for more views). One
forward without and one with Gaussians (the giant forward takes minutes on a few cores); the
network, head and adapter are timed by forward hooks, in wall and CPU seconds (share = head +
adapter over the whole forward). The export is timed (median of 3) in both layouts (INRIA's,
with SH degree 3 records, and the compact degree-0 one): through the service's encoder as a
request runs it (`api.outputs.encode_scene` with `gaussians_ply` and the default scene options:
the filters, the voxel cap at 200,000, the PLY), and the PLY writer alone on every Gaussian.
Prints JSON.

`--memory` measures, with tracemalloc, the host memory of the export that the request budget
prices (`exports.gaussians.gaussian_bytes`): the peak of selecting (with and without filters)
and of writing the PLY and its base64, per input pixel, grid cell and Gaussian written, at
`--res` and at half of it (any preset with the head: the network does not matter here).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time
import tracemalloc

import numpy as np
import torch
from PIL import ImageOps

from common import IMAGES, SNAPSHOTS, snapshot
from da3_serverless.api.outputs import encode_scene
from da3_serverless.api.schema import parse_request
from da3_serverless.exports.gaussians import gaussians_ply, select_gaussians
from da3_serverless.exports.points import SceneOptions
from da3_serverless.inference.predictor import Predictor
from da3_serverless.inference.preprocess import load_rgb
from da3_serverless.model.checkpoint import holds_gaussians, write_random_checkpoint
from da3_serverless.model.presets import GAUSSIAN_RELEASES

PRESET = "da3-giant"


def snapshot_with_head(preset: str):
    """The shared random snapshot of `preset` with the 3D-Gaussian head: the release's for the
    presets that ship it (a snapshot written before the head was part of the layout is
    rewritten: same seed, same other tensors), else one of its own with the head attached."""
    if preset not in GAUSSIAN_RELEASES:
        folder = SNAPSHOTS / f"{preset}-seed0-gaussians"
        if not (folder / "model.safetensors").is_file():
            write_random_checkpoint(preset, folder, seed=0, gaussians=True)
        return folder
    folder = snapshot(preset)
    if not holds_gaussians(folder):
        write_random_checkpoint(preset, folder, seed=0, gaussians=True)
    return folder


def views(count: int) -> list:
    photos = [load_rgb(IMAGES / name)[0] for name in ("soh-000.png", "soh-010.png")]
    pool = photos + [ImageOps.mirror(photo) for photo in photos]
    return [pool[i % len(pool)] for i in range(count)]


def clocks() -> np.ndarray:
    """(wall seconds, CPU seconds of this process): CPU time is steadier on a shared machine."""
    return np.array([time.perf_counter(), time.process_time()])


def timed(modules: dict[str, torch.nn.Module]) -> dict[str, np.ndarray]:
    """(wall, CPU) seconds spent in each named module's forward, filled in by forward hooks."""
    spent = {name: np.zeros(2) for name in modules}
    for name, module in modules.items():
        starts = []
        module.register_forward_pre_hook(lambda *_, s=starts: s.append(clocks()))

        def done(*_, name=name, starts=starts):
            spent[name] += clocks() - starts.pop()

        module.register_forward_hook(done)
    return spent


def export_request(views: int, res: int, compact: bool = False):
    """The v1 request of the export: `gaussians_ply` with the default scene options (its images
    only count the views: the encoder reads the prediction), INRIA's layout or the compact."""
    payload = {"images": [{"base64": ""}] * views, "outputs": ["gaussians_ply"], "process_res": res,
               "gaussians_compact": compact}  # fmt: skip
    return parse_request(payload)


def median_of_3(fn) -> tuple[float, object]:
    """Median wall seconds of three calls of `fn`, and its last result."""
    times, result = [], None
    for _ in range(3):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def traced_peak(fn) -> tuple[int, object]:
    """tracemalloc's peak (bytes above what was allocated before) while `fn` runs."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        return tracemalloc.get_traced_memory()[1] - before, result
    finally:
        tracemalloc.stop()


def memory(predictor: Predictor, images: list, res: int) -> dict:
    """Peaks of selecting and writing, per input pixel, grid cell and Gaussian written."""
    rows = []
    for grid_res in (res, res // 2):
        prediction = predictor.predict(images, process_res=grid_res, gaussians=True)
        cells = len(prediction.gaussians)
        every = SceneOptions(conf_percentile=0, keep_sky=True, remove_edges=False,
                             max_points=cells)  # fmt: skip
        for name, options in (("defaults", SceneOptions()), ("no filters", every)):
            rows.append({"process_res": grid_res, "options": name,
                         **memory_row(prediction, options)})  # fmt: skip
    return {"preset": predictor.preset, "views": len(images), "memory": rows}


def memory_row(prediction, options: SceneOptions) -> dict:
    """The export's peaks for one prediction and one set of scene options."""
    pixels = int(sum(np.size(depth) for depth in prediction.depth))
    cells = len(prediction.gaussians)
    peak, selection = traced_peak(lambda: select_gaussians(prediction, options))
    kept = int(np.count_nonzero(selection.keep))

    def write():
        data = gaussians_ply(prediction.gaussians, keep=selection.keep, comments=["units x"])
        return base64.b64encode(data).decode("ascii")

    written, _ = traced_peak(write)
    return {
        "pixels": pixels, "cells": cells, "kept": kept, "select_peak_bytes": peak,
        "select_bytes_per_pixel": round(peak / pixels, 1),
        "select_bytes_per_cell": round(peak / cells, 1),
        "write_and_base64_bytes_per_gaussian": round(written / max(kept, 1), 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--res", type=int, default=504)
    parser.add_argument("--preset", default=PRESET, help="any preset (the head is attached)")
    parser.add_argument("--memory", action="store_true", help="the export's host memory only")
    args = parser.parse_args()

    folder = snapshot_with_head(args.preset)
    predictor = Predictor.from_pretrained(folder, device="cpu", dtype=torch.float32)
    images = views(args.views)
    if args.memory:
        print(json.dumps(memory(predictor, images, args.res), indent=2))
        return
    print(json.dumps(timings(predictor, images, args.res), indent=2))


# long function: one figure after another, in the order printed
def timings(predictor: Predictor, images: list, res: int) -> dict:
    """The branch's share of the forward, and the export through the service's encoder."""
    net = predictor.network
    branch_owner = getattr(net, "da3", net)  # the nested model's any-view branch has the head
    spent = timed({"network": net, "gs_head": branch_owner.gs_head,
                   "gs_adapter": branch_owner.gs_adapter})  # fmt: skip

    predictor.predict(images, process_res=res)
    plain = spent["network"].copy()
    spent["network"][:] = 0.0
    prediction = predictor.predict(images, process_res=res, gaussians=True)
    forward = spent["network"]

    gaussians = prediction.gaussians
    request = export_request(len(images), res)
    service_s, (artifacts, _) = median_of_3(lambda: encode_scene(request, prediction, []))
    (artifact,) = artifacts
    compact_request = export_request(len(images), res, compact=True)
    compact_s, (compacts, _) = median_of_3(lambda: encode_scene(compact_request, prediction, []))
    writer_s, ply = median_of_3(
        lambda: gaussians_ply(gaussians, comments=[f"units {prediction.units}"])
    )
    compact_writer_s, compact_ply = median_of_3(
        lambda: gaussians_ply(gaussians, comments=[f"units {prediction.units}"], layout="compact")
    )
    branch = spent["gs_head"] + spent["gs_adapter"]
    return {
        "preset": predictor.preset,
        "views": len(images),
        "grid_hw": list(gaussians.opacities.shape[1:]),
        "threads": torch.get_num_threads(),
        "forward_wall_cpu_s": plain.round(2).tolist(),
        "forward_with_gaussians_wall_cpu_s": forward.round(2).tolist(),
        "gs_head_wall_cpu_s": spent["gs_head"].round(2).tolist(),
        "gs_adapter_wall_cpu_s": spent["gs_adapter"].round(3).tolist(),
        "branch_share_of_forward_wall_cpu": (branch / forward).round(4).tolist(),
        "gaussians": len(gaussians),
        "service_export_s": round(service_s, 3),
        "service_export_share_of_forward_with_gaussians": round(service_s / forward[0], 4),
        "service_export_gaussians": artifact.fields["gaussians"]["points"],
        "service_export_removed": artifact.fields["gaussians"]["removed"],
        "service_export_bytes": len(artifact.data),
        "service_export_mib": round(len(artifact.data) / 2**20, 1),
        "service_export_compact_s": round(compact_s, 3),
        "service_export_compact_bytes": len(compacts[0].data),
        "ply_export_s": round(writer_s, 3),
        "ply_bytes": len(ply),
        "ply_mib": round(len(ply) / 2**20, 1),
        "ply_compact_export_s": round(compact_writer_s, 3),
        "ply_compact_bytes": len(compact_ply),
        "ply_compact_mib": round(len(compact_ply) / 2**20, 1),
    }


if __name__ == "__main__":
    main()
