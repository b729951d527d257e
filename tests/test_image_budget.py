"""The container's lock file: CUDA 12.8 torch, fresh against pyproject.toml, under the size budget.

Everything here reads requirements/pylock.docker.toml offline (it records wheel sizes).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "image_budget.py"

_spec = importlib.util.spec_from_file_location("image_budget", SCRIPT)
assert _spec is not None and _spec.loader is not None
image_budget = importlib.util.module_from_spec(_spec)
sys.modules["image_budget"] = image_budget  # dataclasses look their module up there
_spec.loader.exec_module(image_budget)


@pytest.fixture(scope="module")
def locked() -> dict[str, str]:
    """Package name -> locked version, for the packages the image installs."""
    wheels = image_budget.select_wheels(image_budget.load_lock())
    return {canonicalize_name(w.name): w.version for w in wheels}


def test_every_locked_package_has_a_wheel_and_fits_the_budget() -> None:
    wheels = image_budget.select_wheels(image_budget.load_lock())
    assert len(wheels) > 20
    assert all(w.filename.endswith(".whl") and w.size > 0 for w in wheels)
    total = sum(w.size for w in wheels)
    assert total <= image_budget.BUDGET_BYTES, (
        f"the image's wheels are {total / 1e9:.2f} GB, over the budget of "
        f"{image_budget.BUDGET_BYTES / 1e9:.2f} GB (scripts/image_budget.py, docs/DEPLOY.md)"
    )


def test_torch_is_the_cuda_12_8_build(locked: dict[str, str]) -> None:
    assert locked["torch"] == "2.10.0"
    # PyPI's linux torch wheel is a CUDA build; its CUDA version shows in the nvidia-* pins.
    assert locked["nvidia-cuda-runtime-cu12"].startswith("12.8.")
    assert not any(name.startswith("nvidia-") and name.endswith("-cu13") for name in locked)


def test_lock_satisfies_every_runtime_dependency(locked: dict[str, str]) -> None:
    """A dependency added to pyproject.toml without re-running scripts/lock.sh fails here."""
    with (REPO / "pyproject.toml").open("rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    for line in dependencies:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in locked, f"{name} is missing from the lock: run scripts/lock.sh"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"locked {name}=={locked[name]} does not satisfy {line!r}: run scripts/lock.sh"
        )


def test_selection_prefers_the_platform_wheel_and_honours_markers(tmp_path: Path) -> None:
    base = "https://example.invalid/"
    lock = {
        "packages": [
            {
                "name": "fast",
                "version": "1.0",
                "wheels": [
                    {"url": base + "fast-1.0-py3-none-any.whl", "size": 10},
                    {
                        "url": base + "fast-1.0-cp312-cp312-manylinux_2_17_x86_64"
                        ".manylinux2014_x86_64.whl",
                        "size": 20,
                    },
                    {"url": base + "fast-1.0-cp312-cp312-win_amd64.whl", "size": 30},
                ],
            },
            {
                "name": "rebuilt",
                "version": "2.0",
                "wheels": [
                    {"url": base + "rebuilt-2.0-cp312-cp312-manylinux_2_28_x86_64.whl", "size": 5},
                    {
                        "url": base + "rebuilt-2.0-3-cp312-cp312-manylinux_2_28_x86_64.whl",
                        "size": 6,
                    },
                ],
            },
            {
                "name": "windows-only",
                "version": "1.0",
                "marker": "sys_platform == 'win32'",
                "wheels": [{"url": base + "windows_only-1.0-py3-none-any.whl", "size": 99}],
            },
        ]
    }
    chosen = {w.name: (w.filename, w.size) for w in image_budget.select_wheels(lock)}
    assert chosen == {
        "fast": ("fast-1.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", 20),
        "rebuilt": ("rebuilt-2.0-3-cp312-cp312-manylinux_2_28_x86_64.whl", 6),
    }

    source_only = {"packages": [{"name": "slow", "version": "1.0", "sdist": {"url": base}}]}
    with pytest.raises(ValueError, match=r"slow 1\.0: no wheel"):
        image_budget.select_wheels(source_only)


def test_cli_reports_the_total_and_fails_over_budget(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, str(SCRIPT), "--top", "3"], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stderr
    assert "torch==2.10.0" in ok.stdout
    assert "budget 4.50 GB" in ok.stdout

    huge = tmp_path / "pylock.toml"
    huge.write_text(
        'lock-version = "1.0"\n[[packages]]\nname = "huge"\nversion = "1"\n'
        'wheels = [{ url = "https://example.invalid/huge-1-py3-none-any.whl", '
        "size = 9000000000 }]\n"
    )
    over = subprocess.run(
        [sys.executable, str(SCRIPT), "--lock", str(huge)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert over.returncode == 1
    assert "over budget" in over.stderr


def test_the_smoke_venv_takes_the_lock_less_its_gpu_only_packages() -> None:
    """scripts/smoke_env.py (make smoke) installs the lock's own file minus torch's CUDA build
    and what only it needs; the rest, hashes and all, is untouched."""
    spec = importlib.util.spec_from_file_location("smoke_env", REPO / "scripts" / "smoke_env.py")
    assert spec is not None and spec.loader is not None
    smoke_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke_env)
    text = (REPO / "requirements" / "pylock.docker.toml").read_text()
    full = tomllib.loads(text)
    kept = tomllib.loads(smoke_env.without_gpu_packages(text))
    gpu_only = {"torch", "triton"} | {
        p["name"] for p in full["packages"] if p["name"].startswith(("nvidia-", "cuda-"))
    }
    assert len(gpu_only) > 10
    assert kept["packages"] == [p for p in full["packages"] if p["name"] not in gpu_only]
    assert {k: v for k, v in kept.items() if k != "packages"} == {
        k: v for k, v in full.items() if k != "packages"
    }
