#!/usr/bin/env bash
# Regenerates the container's lock file, requirements/pylock.docker.toml (PEP 751), from
# pyproject.toml's dependencies and the CUDA torch pin in requirements/docker.in.
# Needs uv (pip install uv) and PyPI; the dev/CI install (Makefile, CPU torch) does not use it.
set -euo pipefail
cd "$(dirname "$0")/.."

uv="${UV:-uv}"
"$uv" pip compile pyproject.toml requirements/docker.in \
    --python-version 3.12 \
    --python-platform x86_64-manylinux_2_28 \
    --no-python-downloads \
    --format pylock.toml \
    --output-file requirements/pylock.docker.toml \
    --quiet \
    "$@"
