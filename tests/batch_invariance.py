"""Run as a script (`python tests/batch_invariance.py`), in a process of its own so that
`ATEN_CPU_CAPABILITY` (read once, when torch loads) is its own: with 1 and then 2 threads,
small random mono (depth + sky) and nested networks answer 4 random scenes alone and in
batches of other orders and batch-mates. Prints one JSON object: the CPU capability torch
runs with, how many sky probabilities lie near the threshold, and per thread count, network
and output the largest difference between a sample's batched and lone answers, relative to
the lone answer's largest magnitude."""

from __future__ import annotations

import json

import torch

from da3_serverless.model.checkpoint import fill_random
from da3_serverless.model.dpt import DPT
from da3_serverless.model.net import DepthAnything3Net, NestedDepthAnything3Net
from da3_serverless.model.presets import build_network
from da3_serverless.model.vit import DinoV2

SCENES = 4
BATCHES = ([0, 1, 2, 3], [3, 2, 1, 0], [2, 2, 0])
FIELDS = ("depth", "confidence", "sky", "extrinsics", "intrinsics")
SKY_THRESHOLD = 0.3


def networks() -> dict[str, torch.nn.Module]:
    """A ViT-S mono network with the sky head (random stand-in weights: sky on both sides of
    the threshold) and the nested network of a random da3-small and that mono network."""
    mono = DepthAnything3Net(
        DinoV2("vits", [5, 7, 9, 11], cat_token=False),
        DPT(384, features=64, out_channels=[48, 96, 192, 384]),
    )
    mono = fill_random(mono, seed=1).eval()
    with torch.device("meta"):
        anyview = build_network("da3-small")
    nested = NestedDepthAnything3Net(fill_random(anyview, seed=2), mono).eval()
    return {"mono": mono, "nested": nested}


def largest_differences(network: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Per output, the largest |batched - lone| / max |lone| over every sample of `BATCHES`;
    under "near_threshold", how many lone sky probabilities lie within 1e-3 of the threshold
    (where a rounding difference between batched and lone forwards would flip them)."""
    with torch.inference_mode():
        alone = [network(images[i : i + 1]) for i in range(SCENES)]
        worst = {field: 0.0 for field in FIELDS if getattr(alone[0], field) is not None}
        for batch in BATCHES:
            together = network(images[batch])
            for place, scene in enumerate(batch):
                for field in worst:
                    lone = getattr(alone[scene], field)
                    gap = (getattr(together, field)[place] - lone[0]).abs().max()
                    worst[field] = max(worst[field], (gap / lone.abs().max()).item())
    sky = torch.cat([out.sky for out in alone])
    worst["near_threshold"] = int(((sky - SKY_THRESHOLD).abs() < 1e-3).sum())
    return worst


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(SCENES, 1, 3, 42, 56, generator=gen)
    images *= torch.linspace(0.3, 2.0, SCENES)[:, None, None, None, None]
    nets = networks()
    report = {"capability": torch.backends.cpu.get_cpu_capability()}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        report[f"{threads} threads"] = {
            name: largest_differences(network, images) for name, network in nets.items()
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
