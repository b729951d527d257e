"""3D Gaussians of a random-weight DA3-GIANT on CPU: the Gaussian branch's share of a forward,
and the time and size of the 3DGS PLY export, for 4 views at process_res 504.

    PYTHONPATH=src nice -n 10 .venv/bin/python bench/gaussians.py [--views 4] [--res 504]

The views are soh-000.png, soh-010.png and their mirror images (repeated for more views). One
forward without and one with Gaussians (the giant forward takes minutes on a few cores); the
network, head and adapter are timed by forward hooks (share = head + adapter over the whole
forward); the PLY is written from the prediction's Gaussians (median of 3). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import ImageOps
from safetensors import safe_open

from common import IMAGES, snapshot
from da3_serverless.exports.gaussians import gaussians_ply
from da3_serverless.inference.predictor import Predictor
from da3_serverless.inference.preprocess import load_rgb
from da3_serverless.model.checkpoint import WEIGHTS_NAME, write_random_checkpoint

PRESET = "da3-giant"


def giant_snapshot():
    """The shared random da3-giant snapshot, with the 3D-Gaussian head (a snapshot written
    before the head was part of the layout is rewritten: same seed, same other tensors)."""
    folder = snapshot(PRESET)
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as file:
        has_head = any(".gs_head." in key for key in file.keys())  # noqa: SIM118
    if not has_head:
        write_random_checkpoint(PRESET, folder, seed=0, gaussians=True)
    return folder


def views(count: int) -> list:
    photos = [load_rgb(IMAGES / name)[0] for name in ("soh-000.png", "soh-010.png")]
    pool = photos + [ImageOps.mirror(photo) for photo in photos]
    return [pool[i % len(pool)] for i in range(count)]


def timed(modules: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Seconds spent in each named module's forward, filled in by forward hooks."""
    spent = dict.fromkeys(modules, 0.0)
    for name, module in modules.items():
        starts = []
        module.register_forward_pre_hook(lambda *_, s=starts: s.append(time.perf_counter()))

        def done(*_, name=name, starts=starts):
            spent[name] += time.perf_counter() - starts.pop()

        module.register_forward_hook(done)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--res", type=int, default=504)
    args = parser.parse_args()

    predictor = Predictor.from_pretrained(giant_snapshot(), device="cpu", dtype=torch.float32)
    images = views(args.views)
    net = predictor.network
    spent = timed({"network": net, "gs_head": net.gs_head, "gs_adapter": net.gs_adapter})

    start = time.perf_counter()
    predictor.predict(images, process_res=args.res)
    plain, plain_forward = time.perf_counter() - start, spent["network"]
    spent["network"] = 0.0
    start = time.perf_counter()
    prediction = predictor.predict(images, process_res=args.res, gaussians=True)
    with_gaussians = time.perf_counter() - start

    gaussians = prediction.gaussians
    export_times = []
    for _ in range(3):
        start = time.perf_counter()
        ply = gaussians_ply(gaussians, comments=[f"units {prediction.units}"])
        export_times.append(time.perf_counter() - start)
    branch = spent["gs_head"] + spent["gs_adapter"]
    print(
        json.dumps(
            {
                "preset": PRESET,
                "views": args.views,
                "grid_hw": list(gaussians.opacities.shape[1:]),
                "threads": torch.get_num_threads(),
                "predict_s": round(plain, 2),
                "forward_s": round(plain_forward, 2),
                "predict_with_gaussians_s": round(with_gaussians, 2),
                "forward_with_gaussians_s": round(spent["network"], 2),
                "gs_head_s": round(spent["gs_head"], 2),
                "gs_adapter_s": round(spent["gs_adapter"], 3),
                "branch_share_of_forward": round(branch / spent["network"], 4),
                "gaussians": len(gaussians),
                "ply_export_s": round(sorted(export_times)[1], 3),
                "ply_bytes": len(ply),
                "ply_mib": round(len(ply) / 2**20, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
