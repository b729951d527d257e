"""Time and size of the scene outputs (scene_ply, scene_glb, colmap), as a share of the request.

    .venv/bin/python bench/scene_exports.py [--runs 3] [--max-points 200000]

da3-small (random weights) on CPU through `Service.handle` at process_res 504, for two scenes:
8 views of 504 x 280 photos (crops of the test photos) and 2 views of 1208 x 680 photos. For
each, with the default scene options and with `remove_edges` false (more points, so the voxel
thinning runs): the median request time with the three scene outputs and the service's own
`scene` stage (fusing the views plus writing the three files) as a share of it (the goal: under
10 %), then each step alone on the same prediction (fuse, PLY, GLB, COLMAP) and the files'
sizes.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import REPO, snapshot
from da3_serverless.config import Settings
from da3_serverless.exports.colmap import colmap_zip
from da3_serverless.exports.glb import scene_glb
from da3_serverless.exports.ply import scene_ply
from da3_serverless.exports.points import SceneOptions, fuse
from da3_serverless.service import Service

RES = 504
PHOTOS = [REPO / "tests" / "data" / "images" / name for name in ("soh-000.png", "soh-010.png")]
SCENE = ["depth", "scene_ply", "scene_glb", "colmap"]


def small_views() -> list[Image.Image]:
    """8 views of 504 x 280: four crops of each test photo, resized."""
    views = []
    for path in PHOTOS:
        photo = Image.open(path).convert("RGB")
        for left, top in ((0, 0), (74, 0), (0, 50), (74, 50)):
            views.append(photo.crop((left, top, left + 1134, top + 630)).resize((504, 280)))
    return views


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def median_ms(fn, runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 1), result


def measure(service: Service, views: list[Image.Image], runs: int, max_points: int) -> dict:
    """The default scene options, and `remove_edges` false (random weights give noisy depth,
    whose edges remove most pixels: without that filter the voxel thinning has work to do)."""
    results = {}
    for label, remove_edges in (("default options", True), ("remove_edges false", False)):
        payload = {"images": [{"base64": png_base64(v)} for v in views], "process_res": RES,
                   "outputs": SCENE, "max_points": max_points,
                   "remove_edges": remove_edges}  # fmt: skip
        service.handle(payload)  # warm-up
        responses = [service.handle(payload) for _ in range(runs)]
        total = statistics.median(r["timings_ms"]["total"] for r in responses)
        scene = statistics.median(r["timings_ms"]["scene"] for r in responses)
        results[label] = {
            "request_total_ms": round(total, 1),
            "scene_stage_ms": round(scene, 1),
            "scene_share_of_request": round(scene / total, 3),
            **steps_alone(service, views, runs, SceneOptions(max_points=max_points,
                                                             remove_edges=remove_edges)),
        }  # fmt: skip
    return results


def steps_alone(service: Service, views: list[Image.Image], runs: int, options) -> dict:
    """Each step on its own, on the same prediction: fusing, then each file; the sizes."""
    predictor = service.model_cache.get(service.default_model_id)
    prediction = predictor.predict(views, process_res=RES)
    pixels = [np.asarray(v) for v in views]
    fuse_ms, points = median_ms(lambda: fuse(prediction, pixels, options), runs)
    steps = {
        "scene_ply": lambda: scene_ply(points, prediction.units),
        "scene_glb": lambda: scene_glb(points, prediction),
        "colmap": lambda: colmap_zip(points, prediction, pixels),
    }
    files = {name: median_ms(step, runs) for name, step in steps.items()}
    return {
        "points": len(points),
        "removed": points.removed,
        "alone_ms": {"fuse": fuse_ms, **{name: ms for name, (ms, _) in files.items()}},
        "sizes_mb": {name: round(len(data) / 1e6, 2) for name, (_, data) in files.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-points", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workspace:
        settings = Settings(model_id=str(snapshot("da3-small")), workspace=Path(workspace),
                            allow_unauthenticated=True, device="cpu", warmup=False)  # fmt: skip
        service = Service(settings)
        big = [Image.open(path).convert("RGB") for path in PHOTOS]
        results = {
            "8 views of 504x280": measure(service, small_views(), args.runs, args.max_points),
            "2 views of 1208x680": measure(service, big, args.runs, args.max_points),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
