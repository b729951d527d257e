"""3D Gaussians of a random-weight DA3-GIANT on CPU: the Gaussian branch's share of a forward,
and the time and size of the 3DGS PLY export, for 4 views at process_res 504.

    PYTHONPATH=src nice -n 10 .venv/bin/python bench/gaussians.py [--views 4] [--res 504]

The views are soh-000.png, soh-010.png and their mirror images (repeated for more views). One
forward without and one with Gaussians (the giant forward takes minutes on a few cores); the
network, head and adapter are timed by forward hooks, in wall and CPU seconds (share = head +
adapter over the whole forward); the PLY is written from the prediction's Gaussians (median of
3). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--res", type=int, default=504)
    args = parser.parse_args()

    predictor = Predictor.from_pretrained(giant_snapshot(), device="cpu", dtype=torch.float32)
    images = views(args.views)
    net = predictor.network
    spent = timed({"network": net, "gs_head": net.gs_head, "gs_adapter": net.gs_adapter})

    predictor.predict(images, process_res=args.res)
    plain = spent["network"].copy()
    spent["network"][:] = 0.0
    prediction = predictor.predict(images, process_res=args.res, gaussians=True)
    forward = spent["network"]

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
                "forward_wall_cpu_s": plain.round(2).tolist(),
                "forward_with_gaussians_wall_cpu_s": forward.round(2).tolist(),
                "gs_head_wall_cpu_s": spent["gs_head"].round(2).tolist(),
                "gs_adapter_wall_cpu_s": spent["gs_adapter"].round(3).tolist(),
                "branch_share_of_forward_wall_cpu": (branch / forward).round(4).tolist(),
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
