"""The anchors' fit: decoding a LiDAR map and fitting the answer's scale to it.

    .venv/bin/python bench/anchors.py [--photo 4032x3024] [--map 256x192] [--runs 5]

A synthetic one-view prediction of an any-view model at the photo's size (slanted-plane
depth, a confidence map, a camera) off by a known scale, and a 16-bit millimetre depth map of
the true depth at the map's size (the same field of view, as ARKit's and RealSense's aligned
maps are), with holes. Reports the
median seconds of decoding the map (`decode_anchor_maps`) and of the fit applied to the whole
prediction (`fit_anchors`), and the recovered scale's error.
"""

from __future__ import annotations

import argparse
import base64
import io
import json

import numpy as np
from PIL import Image

from common import median_seconds
from da3_serverless.api.anchors import Anchors, decode_anchor_maps, fit_anchors
from da3_serverless.inference.prediction import Prediction

TRUE_SCALE = 2.5


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=_size, default=(4032, 3024))
    parser.add_argument("--map", type=_size, default=(256, 192))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    (width, height), (map_w, map_h) = args.photo, args.map
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    truth = 1.0 + cols / width + 0.5 * rows / height
    prediction = Prediction(
        depth=(truth / TRUE_SCALE)[None], confidence=(1.0 + cols / width)[None], sky=None,
        intrinsics=np.eye(3, dtype=np.float32)[None] * [width, width, 1],
        extrinsics=np.eye(4, dtype=np.float32)[None, :3], is_metric=False, units="relative",
    )  # fmt: skip
    map_rows = ((np.arange(map_h) + 0.5) * height / map_h).astype(int)
    map_cols = ((np.arange(map_w) + 0.5) * width / map_w).astype(int)
    millimetres = np.round(truth[np.ix_(map_rows, map_cols)] * 1000).astype(np.uint16)
    millimetres[::7, ::5] = 0  # holes
    buffer = io.BytesIO()
    Image.fromarray(millimetres).save(buffer, format="PNG")
    entry = {"base64": base64.b64encode(buffer.getvalue()).decode(), "scale": 0.001}
    anchors = Anchors(sparse_depth=[entry])
    maps = decode_anchor_maps(anchors, 1, 10**8)
    _, report = fit_anchors(anchors, maps, prediction)
    result = {
        "photo": f"{width}x{height}", "map": f"{map_w}x{map_h}",
        "observations": report["observations"],
        "decode_s": median_seconds(lambda: decode_anchor_maps(anchors, 1, 10**8), args.runs),
        "fit_and_apply_s": median_seconds(
            lambda: fit_anchors(anchors, maps, prediction), args.runs
        ),
        "scale_error": abs(report["scale"] / TRUE_SCALE - 1),
    }  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
