"""Builds the runtime smoke's venv (scripts/smoke.py) the way the Dockerfile builds the image's.

    python scripts/smoke_env.py VENV [--python python3] [--torch torch==2.13.0] [--uv uv]

The image installs requirements/pylock.docker.toml with uv, then the package with --no-deps.
Here the same, but for the CUDA-only packages: the lock's torch (a CUDA build) and what only it
needs on a GPU (nvidia-*, cuda-*, triton) are left out and `--torch` (a CPU build) is installed
with pip instead, so that a CPU machine runs what ships. No test extras: a dependency that the
package needs but the lock lacks fails the smoke, as it would fail the image.

When the venv's Python is one the lock was made for (its requires-python: 3.12, the image's),
the lock itself is installed, hash-checked. An older one (3.11, the only Python this repository's
CI machine has a CPU torch for) cannot take every locked wheel: then each locked package is
installed at its locked version or, where that release dropped this Python, the newest one
before it that supports it, without dependencies; the differences are printed. Either way
`uv pip check` then confirms that what is installed satisfies every package's requirements.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "pylock.docker.toml"
GPU_ONLY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def run(*command: str | Path) -> str:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{done.stdout}{done.stderr}")
    return done.stdout


def without_gpu_packages(text: str) -> str:
    """The lock file's text less the [[packages]] entries of GPU-only packages."""
    head, *entries = text.split("\n[[packages]]\n")
    kept = [e for e in entries if not GPU_ONLY.match(re.search(r'^name = "(.+)"', e, re.M)[1])]
    return "\n[[packages]]\n".join([head, *kept])


def python_version(python: Path) -> tuple[int, int]:
    out = run(python, "-c", "import sys; print(*sys.version_info[:2])")
    major, minor = map(int, out.split())
    return major, minor


def install_lock(uv: str, python: Path, venv: Path, lock: dict) -> None:
    """The lock (less the GPU packages) as the Dockerfile installs it, or its nearest
    equivalent for an older Python (see the module's docstring)."""
    floor = tuple(int(p) for p in lock["requires-python"].removeprefix(">=").split("."))
    if python_version(python) >= floor:
        filtered = venv / "pylock.smoke.toml"
        filtered.write_text(without_gpu_packages(LOCK.read_text()))
        run(
            uv, "pip", "install", "--python", python, "--preview-features", "pylock", "-r", filtered
        )
        return
    lines = [
        f"{p['name']}<={p['version']}" + (f" ; {p['marker']}" if p.get("marker") else "")
        for p in lock["packages"]
        if not GPU_ONLY.match(p["name"])
    ]
    pins = venv / "smoke-requirements.txt"
    pins.write_text("\n".join(lines) + "\n")
    run(uv, "pip", "install", "--python", python, "--no-deps", "-r", pins)
    installed = {
        re.sub(r"[-_.]+", "-", name).lower(): version
        for name, _, version in (
            line.partition("==") for line in run(uv, "pip", "freeze", "--python", python).split()
        )
    }
    for p in lock["packages"]:
        got = installed.get(p["name"])
        if got and got != p["version"] and not GPU_ONLY.match(p["name"]):
            print(
                f"smoke venv: {p['name']} {got} (the lock has {p['version']}, not for this Python)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--python", default=sys.executable, help="the venv's interpreter")
    parser.add_argument("--torch", default="torch==2.13.0", help="a CPU build, for pip")
    parser.add_argument("--uv", default="uv")
    args = parser.parse_args()
    with LOCK.open("rb") as f:
        lock = tomllib.load(f)
    run(args.python, "-m", "venv", "--clear", args.venv)
    python = args.venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", args.torch)
    install_lock(args.uv, python, args.venv, lock)
    run(args.uv, "pip", "install", "--python", python, "--no-deps", REPO)
    subprocess.run([args.uv, "pip", "check", "--python", str(python)], check=True)


if __name__ == "__main__":
    main()
