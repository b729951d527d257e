"""Cold start: importing the serving code loads nothing heavier than torch itself.

`torch.compile`'s machinery (torch._dynamo, torch._inductor and the sympy they import) costs
over a second and ~70 MiB at import; only a process that compiles may load it
(bench/cold_start.py measures the whole start). Each import runs in a fresh interpreter, since
this test process may have loaded them already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from da3_serverless.model import layers
from paths import REPO

COMPILE_MACHINERY = ("torch._dynamo", "torch._inductor", "sympy")
ENTRY_POINTS = [
    "da3_serverless.model.net",
    "da3_serverless.inference.predictor",
    "da3_serverless.service",
    "da3_serverless.runpod_worker",
    "da3_serverless.server.app",
    "da3_serverless.server.state",
    "da3_serverless.cli",
]


@pytest.mark.slow  # a fresh interpreter imports all the serving code: over 10 s on two cores
def test_importing_the_serving_code_loads_no_compile_machinery() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {ENTRY_POINTS!r}:\n"
        "    importlib.import_module(name)\n"
        f"    print(json.dumps([name, [m for m in {COMPILE_MACHINERY!r} if m in sys.modules]]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    loaded = dict(json.loads(line) for line in done.stdout.splitlines() if line.startswith('["'))
    assert loaded == {name: [] for name in ENTRY_POINTS}


def test_a_compiled_forward_still_calls_its_stop_points() -> None:
    """Once compiling (Predictor.compile does this first), each stop_point is a graph break that
    runs its check on every call, not a value traced once."""
    layers.keep_stop_points_out_of_compile()
    calls: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x * 2
        layers.stop_point(lambda: calls.append(1))
        return x + 1

    compiled = torch.compile(forward, backend="eager", fullgraph=False)
    for _ in range(3):
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))
    assert len(calls) == 3
