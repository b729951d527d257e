"""`da3-serverless` predict, warmup, prefetch and prune, run as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from conftest import SMALL_REPO
from paths import IMAGES


def cli(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "da3_serverless.cli", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_predict_writes_every_array_and_a_line_per_image(service_env, tmp_path, small_snapshot):
    out = tmp_path / "out" / "scene.npz"
    images = [str(IMAGES / "soh-000.png"), str(IMAGES / "soh-010.png")]
    done = cli(service_env, "predict", *images, "--model", str(small_snapshot),
               "--process-res", "140", "-o", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "depth" in line]
    assert len(lines) == 2 and lines[0].startswith(images[0]) and "1208x680" in lines[0]
    arrays = np.load(out)
    assert arrays["depth"].shape == (2, 680, 1208)
    assert arrays["confidence"].shape == (2, 680, 1208)
    assert arrays["intrinsics"].shape == (2, 3, 3) and arrays["extrinsics"].shape == (2, 3, 4)
    assert str(arrays["units"]) == "relative"


def test_predict_bad_input_exits_2_with_the_reason(service_env, tmp_path, small_snapshot):
    done = cli(service_env, "predict", str(tmp_path / "missing.jpg"), "--model",
               str(small_snapshot), "-o", str(tmp_path / "x.npz"))  # fmt: skip
    assert done.returncode == 2
    assert "cannot read" in done.stderr and "Traceback" not in done.stderr


def test_warmup_succeeds_and_fails_loudly(service_env):
    done = cli(service_env, "warmup")
    assert done.returncode == 0, done.stderr
    assert f"warmup of {SMALL_REPO} ok" in done.stdout
    done = cli(service_env, "warmup", "--model", "depth-anything/DA3-BASE")
    assert done.returncode == 1
    assert "warmup of depth-anything/DA3-BASE failed" in done.stderr
    assert "not found" in done.stderr


def test_prefetch_finds_cached_and_names_what_is_missing_offline(service_env, hf_cache):
    done = cli(service_env, "prefetch", "da3-small", "depth-anything/DA3-GIANT-1.1")
    assert done.returncode == 1
    assert done.stdout.startswith("da3-small: ") and str(hf_cache) in done.stdout
    assert "depth-anything/DA3-GIANT-1.1: missing" in done.stderr
    assert "offline" in done.stderr


def test_prune_removes_only_old_outputs(service_env):
    outputs = os.path.join(service_env["WORKSPACE"], "output_images")
    os.makedirs(outputs)
    old, new = os.path.join(outputs, "old.png"), os.path.join(outputs, "new.png")
    for path in (old, new):
        with open(path, "wb") as file:
            file.write(b"x")
    month_ago = time.time() - 30 * 86400
    os.utime(old, (month_ago, month_ago))
    done = cli(service_env, "prune")
    assert done.returncode == 0, done.stderr
    assert f"removed {old}" in done.stdout and "pruned 1 file(s)" in done.stdout
    assert not os.path.exists(old) and os.path.exists(new)
