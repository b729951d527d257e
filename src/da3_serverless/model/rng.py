"""Deterministic random sampling for ray pose (RANSAC), the one post-processing step that draws.

The reference implementation samples from torch's global generator. We draw the same numbers in
the same order from a local generator seeded with `RNG_SEED`, so a forward pass gives the same
answer every time and never touches (or depends on) the global random state. Each batch sample
has its own generator, so a photo's answer does not depend on its batch-mates. (The reference
also samples for its sky and alignment quantiles; ours are exact: `model/alignment.py`.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RNG_SEED = 0


def seeded_generator(device: torch.device | str) -> torch.Generator:
    """A fresh generator on `device` seeded with `RNG_SEED` (on CPU it yields the same stream
    as the global generator after `torch.manual_seed(RNG_SEED)`)."""
    return torch.Generator(device=device).manual_seed(RNG_SEED)


def per_sample_generators(
    generator: torch.Generator | Sequence[torch.Generator] | None,
    batch: int,
    device: torch.device | str,
) -> list[torch.Generator]:
    """One generator per batch sample: None gives `batch` fresh seeded ones; a single generator
    serves a batch of one; a sequence must hold one generator per sample."""
    if generator is None:
        return [seeded_generator(device) for _ in range(batch)]
    if isinstance(generator, torch.Generator):
        generator = [generator]
    generators = list(generator)
    if len(generators) != batch:
        raise ValueError(
            f"got {len(generators)} random generator(s) for a batch of {batch}: give one per "
            "sample (or None for fresh seeded ones)"
        )
    return generators
