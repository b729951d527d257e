"""The GPU check, ready before a GPU is: `bench/gpu.py --device cpu --quick` runs the same code
as on the GPU and reports its JSON rows and table; `scripts/gpu_wheels.sh` brings the wheels it
needs on a machine without a registry (its arguments, pins and checks, without the network)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paths import REPO
from test_precision import BF16_DEPTH_REL_MAX, BF16_DEPTH_REL_P99

BENCH = REPO / "bench" / "gpu.py"
WHEELS = REPO / "scripts" / "gpu_wheels.sh"
# What the GPU machine does not have, so the check must not import it.
NOT_ON_THE_GPU_MACHINE = {"pydantic", "pydantic-settings", "fastapi", "runpod", "uvicorn"}


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--quick", "--out", str(out),
         "--snapshots", str(tmp_path / "snapshots"), *args],
        capture_output=True, text=True, env=env, check=False, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert (out / "table.md").read_text() in done.stdout
    return done, rows


def by_measure(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["measure"], []).append(row)
    return grouped


@pytest.mark.slow
def test_quick_cpu_run_measures_everything_and_reports(tmp_path):
    done, rows = run_bench(tmp_path)
    measures = by_measure(rows)
    environment = measures["environment"][0]
    assert environment["torch"] == torch.__version__
    assert f"torch {torch.__version__}" in done.stdout
    assert [r["dtype"] for r in measures["load"]] == ["bfloat16", "float32"]
    assert all(r["seconds"] > 0 and r["weight_bytes"] > 0 for r in measures["load"])
    assert measures["load"][0]["weight_bytes"] < measures["load"][1]["weight_bytes"]
    assert [r["views"] for r in measures["predict"]] == [1, 2]
    assert [r["views"] for r in measures["network forward"]] == [1, 2]
    for name in ("batching on", "batching off"):
        (row,) = measures[name]
        assert row["photos"] == 2 and row["photos_per_s"] > 0
    (sequence,) = measures["sequence"]  # 6 frames in chunks of 4: 2 chunks, each frame once
    assert sequence["frames"] == 6 and sequence["frames_per_s"] > 0
    assert "frames/s" in done.stdout
    (error,) = measures["bf16 vs fp32"]
    assert 0 < error["error_p99"] < BF16_DEPTH_REL_P99 and error["error_max"] < BF16_DEPTH_REL_MAX
    references = measures["reference forward"]
    assert [r["views"] for r in references] == [1, 2] and all(r["speedup"] > 0 for r in references)
    assert references[0]["ours_vs_reference_error_p99"] < 0.05
    assert "skipped" in measures["compiled"][0]
    (imports,) = measures["imports"]
    assert {"torch", "depth-anything-3"} <= set(imports["distributions"])
    assert not NOT_ON_THE_GPU_MACHINE & set(imports["distributions"])
    # One table line per measurement row, with the header.
    table_lines = [line for line in done.stdout.splitlines() if line.startswith("| da3-small |")]
    assert len(table_lines) == len([r for r in rows if r["preset"] == "da3-small"])
    assert "| preset | measurement | shape | result | peak memory | back |" in done.stdout


@pytest.mark.slow  # runs bench/gpu.py in a fresh interpreter: over 10 s on two cores
def test_a_run_past_its_budget_still_reports(tmp_path):
    """Past --budget-s every measurement left is a row saying it was skipped, and the table
    is still written: a run cut short reports what it has."""
    done, rows = run_bench(tmp_path, "--budget-s", "0.001")
    measures = by_measure(rows)
    assert measures["load"][0]["skipped"].startswith("time budget")
    assert "skipped: time budget" in done.stdout
    assert not (tmp_path / "snapshots").exists()  # nothing written for skipped presets


@pytest.mark.slow  # runs bench/gpu.py in a fresh interpreter: over 10 s on two cores
def test_unknown_arguments_are_refused(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH), "--out", str(tmp_path), "--bogus"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert done.returncode == 2 and "--bogus" in done.stderr


# ---- scripts/gpu_wheels.sh -----------------------------------------------------------------


def wheels(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(WHEELS), *args], capture_output=True, text=True, check=False, cwd=REPO
    )


def test_wheel_pins_are_the_versions_the_suite_runs_against():
    pins = wheels("--list").stdout.split()
    assert [pin.split("==")[0] for pin in pins] == [
        "depth-anything-3", "einops", "omegaconf", "PyYAML", "addict",
    ]  # fmt: skip
    for pin in pins:
        name, version = pin.split("==")
        assert importlib.metadata.version(name) == version, pin
    makefile = (REPO / "Makefile").read_text()
    assert f"REFERENCE_SPEC ?= {pins[0]}" in makefile


def test_download_command_asks_for_wheels_of_the_gpu_interpreter_only():
    command = wheels("--dry-run", "--dest", "/tmp/wheel-dest").stdout
    for part in (
        "download --no-deps --only-binary=:all: --dest /tmp/wheel-dest",
        "--python-version 3.12 --implementation cp --abi cp312",
        "--platform manylinux2014_x86_64",
    ):
        assert part in command
    assert all(pin in command for pin in wheels("--list").stdout.split())
    assert "--abi cp313" in wheels("--dry-run", "--python-version", "3.13").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--python-version", "312"], "is not like 3.12"),
        (["--max-mib", "lots"], "is not a whole number"),
        (["--dest"], "--dest needs a folder"),
    ],
)
def test_bad_arguments_are_refused(args, message):
    done = wheels(*args)
    assert done.returncode != 0 and message in done.stderr


def test_help_is_the_header():
    done = wheels("--help")
    assert done.returncode == 0 and "PYTHONPATH=src:/tmp/gpu-deps" in done.stdout


def test_check_accepts_pure_and_cp312_manylinux_wheels_within_budget(tmp_path):
    for name in (
        "einops-0.8.2-py3-none-any.whl",
        "addict-2.4.0-py2.py3-none-any.whl",
        "pyyaml-6.0.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    ):
        (tmp_path / name).write_bytes(b"0" * 1024)
    done = wheels("--check", str(tmp_path), "--max-mib", "1")
    assert done.returncode == 0, done.stderr
    assert re.search(r"3 KiB +total", done.stdout)


@pytest.mark.parametrize(
    ("name", "size", "message"),
    [
        ("pyyaml-6.0.4-cp311-cp311-manylinux2014_x86_64.whl", 10, "not a pure-Python or cp312"),
        ("pyyaml-6.0.4-cp312-cp312-macosx_11_0_arm64.whl", 10, "not a pure-Python or cp312"),
        ("omegaconf-2.4.0.tar.gz", 10, "not a pure-Python or cp312"),
        ("einops-0.8.2-py3-none-any.whl", 2 * 1024 * 1024, "more than 1 MiB"),
    ],
)
def test_check_refuses_other_wheels_and_too_much(tmp_path, name, size, message):
    (tmp_path / name).write_bytes(b"0" * size)
    done = wheels("--check", str(tmp_path), "--max-mib", "1")
    assert done.returncode == 1 and message in done.stderr
