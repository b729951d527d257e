"""Output encoding speed on a 4096 x 4096 map (the largest input side), printed, not asserted.

.venv/bin/python bench/encoding.py [--side 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from da3_serverless.exports.encoding import (
    decode_depth_png16,
    encode_confidence,
    encode_depth_png16,
    encode_npy,
    encode_pointcloud_ply,
    encode_preview,
    encode_sky_mask,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.side
    # A smooth scene with a step and mild noise, like a real depth map.
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    noise = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    depth = 2 + np.sin(x / 200) + np.cos(y / 300) + (x > n / 2) * 1.5 + 0.002 * noise
    rgb = np.zeros((n, n, 3), np.uint8)
    k = np.array([[0.8 * n, 0, n / 2], [0, 0.8 * n, n / 2], [0, 0, 1]])
    png = encode_depth_png16(depth).png
    cases = {
        "depth png16": lambda: encode_depth_png16(depth),
        "decode png16": lambda: decode_depth_png16(png),
        "preview": lambda: encode_preview(depth),
        "confidence": lambda: encode_confidence(depth),
        "sky mask": lambda: encode_sky_mask(depth / 5),
        "npy": lambda: encode_npy(depth),
        "pointcloud (2M points)": lambda: encode_pointcloud_ply(depth, k, rgb),
    }
    print(f"{n}x{n}, median of {args.repeats}; depth PNG is {len(png) / 1e6:.1f} MB")
    for name, fn in cases.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"{name:>24}: {statistics.median(times) * 1000:7.0f} ms")


if __name__ == "__main__":
    main()
