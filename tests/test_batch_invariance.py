"""A batched answer equals the lone one within 1e-5, on other CPU kernels and thread counts.

Each run is a subprocess (tests/batch_invariance.py) under one `ATEN_CPU_CAPABILITY`, with
oneDNN and MKL held to the same instruction set, so a machine whose kernels round differently
(CI's) is imitated here: with 1 and 2 threads, a random mono network (sky head, with sky
probabilities near the 0.3 threshold) and a random nested network answer scenes alone and in
batches of other orders and batch-mates; every output of every sample must match.

What makes it so: the dense heads run each batch sample's views apart (convolutions choose
their algorithm, and so their rounding, by batch size), so a sample's maps are bit-identical
whatever its batch-mates; quantiles are exact (model/alignment.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from da3_serverless.model.checkpoint import fill_random
from da3_serverless.model.dpt import DPT, DualDPT
from paths import REPO

# ATEN_CPU_CAPABILITY -> (what torch reports, oneDNN's and MKL's names of the same level).
KERNELS = {
    "default": ("DEFAULT", "SSE41", "SSE4_2"),
    "avx2": ("AVX2", "AVX2", "AVX2"),
    "avx512": ("AVX512", "AVX512_CORE", "AVX512"),
}
TOLERANCE = 1e-5


def run_check(capability: str) -> dict:
    reported, onednn, mkl = KERNELS[capability]
    env = os.environ | {
        "ATEN_CPU_CAPABILITY": capability,
        "ONEDNN_MAX_CPU_ISA": onednn,
        "MKL_ENABLE_INSTRUCTIONS": mkl,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "batch_invariance.py")],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["capability"] == reported
    return report


@pytest.mark.slow  # about half a minute of CPU per kernel set
@pytest.mark.parametrize("capability", list(KERNELS))
def test_batched_answers_equal_lone_ones_on_every_kernel_set(capability):
    if capability == "avx512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512")
    report = run_check(capability)
    for threads in ("1 threads", "2 threads"):
        for network, gaps in report[threads].items():
            # The sky probabilities come near the threshold, so a flip would show.
            assert gaps.pop("near_threshold") > 0, network
            assert set(gaps) >= {"depth", "sky"}
            for field, gap in gaps.items():
                assert gap <= TOLERANCE, f"{threads}, {network}, {field}: {gap:.2e}"


@pytest.mark.parametrize("head_class", [DPT, DualDPT])
def test_a_heads_maps_of_a_sample_do_not_depend_on_its_batch_mates(head_class):
    head = fill_random(head_class(96, features=64, out_channels=[48, 96, 192, 384]), seed=3)
    gen = torch.Generator().manual_seed(4)
    # 4 samples of 1 view of 5 x 7 patches: (tokens, camera token) of 4 backbone layers.
    feats = [(torch.randn(4, 1, 35, 96, generator=gen), torch.randn(4, 1, 96, generator=gen))]
    feats *= 4
    with torch.inference_mode():
        together = head.eval()(feats, 70, 98, patch_start_idx=0)
        for index in range(4):
            sample = [(tokens[index : index + 1], cam[index : index + 1]) for tokens, cam in feats]
            alone = head(sample, 70, 98, patch_start_idx=0)
            for name, maps in alone.items():
                assert torch.equal(together[name][index], maps[0]), name
