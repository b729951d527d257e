"""The container's Python footprint, computed offline from its lock file, against a budget.

Reads requirements/pylock.docker.toml (PEP 751: it records every wheel's URL, hash and size),
picks for each package the wheel an installer takes on CPython 3.12 / linux x86_64
(manylinux_2_28, the image's platform), and adds up their sizes. That is the download the image
build makes; the CUDA base image and the unpacked size (larger: see docs/DEPLOY.md) are not
counted. A package with no wheel for the platform is an error: the image builds nothing from
source.

Usage: python scripts/image_budget.py [--lock PATH] [--top N]; exit status 1 when over budget.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
LOCK_PATH = REPO / "requirements" / "pylock.docker.toml"

# Compressed wheel bytes of everything the image installs (4.21 GB at torch 2.10.0, of which
# torch, triton and the nvidia-*-cu12 libraries are 4.1 GB). Documented in docs/DEPLOY.md; raise
# it only on purpose.
BUDGET_BYTES = 4_500_000_000

PYTHON = (3, 12)
# Newest first: the order is the installer's preference among a package's wheels.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
# The environment markers see inside the image.
MARKER_ENV = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
}


@dataclass(frozen=True)
class LockedWheel:
    """The wheel one locked package installs in the image."""

    name: str
    version: str
    filename: str
    size: int


def target_tags() -> list[Tag]:
    """Tags the image's interpreter accepts, most preferred first."""
    return [
        *cpython_tags(python_version=PYTHON, abis=["cp312"], platforms=PLATFORMS),
        *compatible_tags(python_version=PYTHON, interpreter="cp312", platforms=PLATFORMS),
    ]


def select_wheels(lock: dict, tags: list[Tag] | None = None) -> list[LockedWheel]:
    """One wheel per package of a parsed pylock.toml whose marker holds in the image.

    Among a package's wheels the best-ranked tag wins, then the higher build number. Raises
    ValueError naming the package when none fits, or when a wheel's size is not recorded.
    """
    rank = {tag: i for i, tag in enumerate(tags or target_tags())}
    chosen: list[LockedWheel] = []
    for package in lock.get("packages", []):
        marker = package.get("marker")
        if marker and not Marker(marker).evaluate(MARKER_ENV):
            continue
        best: tuple[tuple[int, int], dict] | None = None
        for wheel in package.get("wheels", []):
            filename = wheel.get("name") or wheel["url"].rsplit("/", 1)[-1]
            _, _, build, wheel_tags = parse_wheel_filename(filename)
            ranks = [rank[tag] for tag in wheel_tags if tag in rank]
            if not ranks:
                continue
            key = (min(ranks), -(build[0] if build else 0))
            if best is None or key < best[0]:
                best = (key, {**wheel, "name": filename})
        name = package["name"]
        if best is None:
            raise ValueError(f"{name} {package.get('version')}: no wheel for cp312 linux x86_64")
        wheel = best[1]
        if "size" not in wheel:
            raise ValueError(f"{name}: the lock file does not record the size of {wheel['name']}")
        chosen.append(LockedWheel(name, package.get("version", ""), wheel["name"], wheel["size"]))
    return chosen


def load_lock(path: Path = LOCK_PATH) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=LOCK_PATH)
    parser.add_argument("--top", type=int, default=10, help="list the N largest wheels")
    args = parser.parse_args(argv)

    wheels = select_wheels(load_lock(args.lock))
    total = sum(w.size for w in wheels)
    for w in sorted(wheels, key=lambda w: w.size, reverse=True)[: args.top]:
        print(f"{w.size / 1e6:10.1f} MB  {w.name}=={w.version}")
    print(f"{len(wheels)} wheels, {total / 1e9:.2f} GB; budget {BUDGET_BYTES / 1e9:.2f} GB")
    if total > BUDGET_BYTES:
        print("over budget: see docs/DEPLOY.md (image size budget)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
