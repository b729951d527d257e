"""CPU forward speed of our network against the reference, same process, same weights.

    .venv/bin/python bench/cpu_forward.py [--presets da3-small da3-large] [--runs 5] [--compile]

For each preset: soh-000.png at process_res 504, median of `--runs` after warm-up, ours
(eager; ray pose off and on; optionally compiled) against (a) the reference network in fp32 and
(b) the reference's own default inference path (its autocast wrapper). Also the FLOPs of one
forward and the achieved GFLOP/s against a large fp32 matmul's. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import IMAGES, interleaved_medians, load_reference, matmul_gflops, snapshot
from da3_serverless.inference.predictor import Predictor
from da3_serverless.inference.preprocess import load_rgb, processing_size, to_network_input


def max_relative_difference(ours, reference) -> float:
    """Largest |a-b| / max|b| over depth, confidence and cameras."""
    worst = 0.0
    for name, ref_name in (
        ("depth", "depth"),
        ("confidence", "depth_conf"),
        ("extrinsics", "extrinsics"),
    ):
        a = getattr(ours, name)
        b = reference.get(ref_name) if hasattr(reference, "get") else None
        if a is None or b is None:
            continue
        b = b[..., :3, :] if name == "extrinsics" else b
        a, b = a.float().reshape(-1), b.float().reshape(-1)
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)))
    return worst


def bench_preset(preset: str, runs: int, compile_too: bool) -> dict:
    folder = snapshot(preset)
    predictor = Predictor.from_pretrained(folder, device="cpu", dtype=torch.float32)
    reference = load_reference(preset, folder)
    image, _ = load_rgb(IMAGES / "soh-000.png")
    batch = to_network_input([image], processing_size(*image.size, 504))
    ours_net, ref_net = predictor.network, reference.model

    with torch.inference_mode():
        medians = interleaved_medians(
            {
                "ours": lambda: ours_net(batch),
                "reference_fp32": lambda: ref_net(batch),
                "ours_ray_pose": lambda: ours_net(batch, use_ray_pose=True),
                "reference_fp32_ray_pose": lambda: ref_net(batch, use_ray_pose=True),
            },
            runs=runs,
        )
        # The reference's default path on CPU: its wrapper's autocast (float16 without CUDA).
        medians.update(
            interleaved_medians(
                {"reference_default": lambda: reference(batch, export_feat_layers=[])}, runs
            )
        )
        difference = max_relative_difference(ours_net(batch), ref_net(batch))
        with FlopCounterMode(display=False) as counter:
            ours_net(batch)
    flops = counter.get_total_flops()
    result = {
        "preset": preset,
        "input": list(batch.shape),
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "speedup_vs_reference_fp32": round(medians["reference_fp32"] / medians["ours"], 3),
        "speedup_vs_reference_default": round(medians["reference_default"] / medians["ours"], 3),
        "speedup_ray_pose_vs_reference_fp32": round(
            medians["reference_fp32_ray_pose"] / medians["ours_ray_pose"], 3
        ),
        "max_relative_difference": difference,
        "gflops_per_forward": round(flops / 1e9, 2),
        "achieved_gflops_per_s": round(flops / medians["ours"] / 1e9, 1),
    }
    if compile_too:
        result["compiled"] = bench_compiled(predictor, batch, ours_net, ref_net, runs)
    return result


def bench_compiled(predictor: Predictor, batch, eager_net, ref_net, runs: int) -> dict:
    """Opt-in compiled path: compile time, speed against the reference, outputs vs eager."""
    with tempfile.TemporaryDirectory() as cache, torch.inference_mode():
        eager = eager_net(batch)
        predictor.compile(Path(cache))
        start = time.perf_counter()
        compiled_out = predictor.network(batch)
        compile_s = time.perf_counter() - start
        medians = interleaved_medians(
            {
                "compiled": lambda: predictor.network(batch),
                "reference_fp32": lambda: ref_net(batch),
            },
            runs=runs,
        )
        depth_diff = float((compiled_out.depth - eager.depth).abs().max() / eager.depth.abs().max())
    return {
        "first_call_compile_s": round(compile_s, 2),
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "speedup_vs_reference_fp32": round(medians["reference_fp32"] / medians["compiled"], 3),
        "max_relative_depth_difference_vs_eager": depth_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["da3-small", "da3-large"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also the torch.compile path")
    args = parser.parse_args()
    torch.manual_seed(0)
    summary = {
        "threads": torch.get_num_threads(),
        "matmul_fp32_gflops_per_s": round(matmul_gflops(), 1),
        "presets": [bench_preset(p, args.runs, args.compile) for p in args.presets],
    }
    for entry in summary["presets"]:
        entry["share_of_matmul_peak"] = round(
            entry["achieved_gflops_per_s"] / summary["matmul_fp32_gflops_per_s"], 3
        )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
