"""What moves a metric answer with `process_res`: the service's share, measured; the network's
share, measured when real weights are given.

    .venv/bin/python bench/metric_res.py
    .venv/bin/python bench/metric_res.py --snapshot ~/DA3METRIC-LARGE --focal 1450 photo.jpg
    .venv/bin/python bench/metric_res.py --snapshot ~/DA3NESTED-GIANT-LARGE-1.1 photo.jpg

1. The stretch: the network sees the photo with its longest side at `process_res` and both
   sides rounded to the 14-pixel patch, so its two axes are scaled by slightly different
   factors. The metric conventions take the mean of the two focal lengths; the stretch
   (sx / sy - 1) bounds how far that mean can be from either axis's own. Printed for common
   photo sizes at each `process_res`.
2. The bookkeeping: oracle networks (tests/metric_oracle.py) answer a known scene exactly, so
   the answer's error at each `process_res` is the service's alone (resize, focal length in
   network pixels, nested alignment, maps resized back): median relative error per model.
3. With `--snapshot` (a DA3METRIC-LARGE, nested or pair snapshot folder; real weights, which
   this machine cannot download) and photos: the median depth of each photo at each
   `process_res`, relative to its answer at 504 (`--focal`: focal length in input pixels, for
   DA3METRIC-LARGE). Random weights would measure nothing about the network, so nothing is
   run without `--snapshot`.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from common import IMAGES
from da3_serverless.inference.predictor import Predictor
from da3_serverless.inference.preprocess import processing_size
from metric_oracle import MetricOracle, nested_oracle, true_depth

RESOLUTIONS = (280, 392, 504, 756, 1008, 1512)
PHOTO_SIZES = ((4032, 3024), (4000, 2250), (1920, 1080), (1280, 720), (1208, 680), (640, 480))


def stretch_table() -> list[dict]:
    """Per photo size and process_res: the network input and its stretch sx / sy - 1."""
    rows = []
    for width, height in PHOTO_SIZES:
        row = {"photo": f"{width}x{height}"}
        for res in RESOLUTIONS:
            net_w, net_h = processing_size(width, height, res)
            row[str(res)] = round((net_w / width) / (net_h / height) - 1, 5)
        rows.append(row)
    return rows


def oracle_errors(size: tuple[int, int] = (1208, 680)) -> dict:
    """Median relative error of each oracle's answer at each process_res."""
    focal = 0.8 * max(size)
    photo = Image.new("RGB", size, (90, 120, 150))
    truth = true_depth(size[1], size[0]).numpy()
    errors = {}
    for name, network, preset in (
        ("da3metric-large", MetricOracle(focal, size), "da3metric-large"),
        ("nested / pairs", nested_oracle(focal, size), "da3nested-giant-large"),
    ):
        predictor = Predictor(network, preset, device="cpu")
        errors[name] = {
            str(res): float(np.median(np.abs(_depth(predictor, photo, res, focal) - truth) / truth))
            for res in RESOLUTIONS
        }
    return errors


def _depth(predictor: Predictor, photo, res: int, focal: float | None) -> np.ndarray:
    focal = focal if predictor.needs_focal else None
    return predictor.predict(photo, process_res=res, focal_length_px=focal).depth[0]


def network_moves(snapshot: str, photos: list[str], focal: float | None) -> dict:
    """Each photo's median depth at each process_res relative to its median at 504."""
    predictor = Predictor.from_pretrained(snapshot, device="cpu")
    rows = {}
    for path in photos:
        photo = Image.open(path)
        medians = {r: float(np.median(_depth(predictor, photo, r, focal))) for r in RESOLUTIONS}
        rows[path] = {str(res): round(m / medians[504], 4) for res, m in medians.items()}
    return {"model": predictor.model_id, "median_depth_vs_504": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="*", help="photos for --snapshot (default: the tests')")
    parser.add_argument("--snapshot", help="a real-weight snapshot folder (metric, nested, pair)")
    parser.add_argument("--focal", type=float, help="focal length in input pixels (DA3METRIC)")
    args = parser.parse_args()
    print("stretch sx / sy - 1 of the network's input, by process_res")
    _table("photo", stretch_table())
    print("\nmedian relative error of the oracles' answers (the service's own share)")
    _table("model", [{"model": k, **v} for k, v in oracle_errors().items()])
    if args.snapshot:
        photos = args.photos or [str(p) for p in sorted(IMAGES.glob("soh-*.png"))]
        moves = network_moves(args.snapshot, photos, args.focal)
        print(f"\n{moves['model']}: median depth relative to process_res 504")
        _table("photo", [{"photo": k, **v} for k, v in moves["median_depth_vs_504"].items()])


def _table(first: str, rows: list[dict]) -> None:
    """`rows` as a Markdown table, `first` the first column, then one per process_res."""
    print(f"| {first} | " + " | ".join(map(str, RESOLUTIONS)) + " |")
    print("|---" * (len(RESOLUTIONS) + 1) + "|")
    for row in rows:
        cells = [f"{row[str(res)]:.3g}" for res in RESOLUTIONS]
        print(f"| {row[first]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
