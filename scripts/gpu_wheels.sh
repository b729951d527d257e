#!/usr/bin/env bash
# The wheels the GPU check (bench/gpu.py) needs on a machine that has Python 3.12, torch, numpy,
# Pillow, safetensors and huggingface_hub but reaches no registry: the reference implementation
# and its small dependencies, pure Python or manylinux x86_64 for CPython 3.12, downloaded into
# DEST (default .whl/, git-ignored) and kept within a size budget (the working tree travels to
# the GPU machine in 64 MiB, these wheels included).
#
#   scripts/gpu_wheels.sh [--dest DIR] [--python-version 3.12] [--max-mib 16]
#   scripts/gpu_wheels.sh --list            # the pinned wheels, one per line
#   scripts/gpu_wheels.sh --dry-run         # the pip command, not run
#   scripts/gpu_wheels.sh --check DIR       # check a folder of wheels (tags, size), no download
#
# Then, on the GPU machine (no registry, no network):
#   python -m pip install --no-index --no-deps --target /tmp/gpu-deps .whl/*.whl
#   PYTHONPATH=src:/tmp/gpu-deps python bench/gpu.py --out "$OUT"
#
# PIP (default: python3 -m pip) is the pip that downloads. The pins are the versions the test
# suite runs against (tests/test_gpu_bench.py checks them against the installed ones).
set -euo pipefail

WHEELS=(
  depth-anything-3==0.1.1 # the reference, the parity oracle (installed --no-deps)
  einops==0.8.2
  omegaconf==2.4.0
  PyYAML==6.0.4 # omegaconf's one dependency (huggingface_hub has it too)
  addict==2.4.0
)

usage() { # usage EXIT_CODE: the header above, on stderr when it answers a mistake
  if [ "$1" = 0 ]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  else
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  fi
  exit "$1"
}

dest=.whl
python_version=3.12
max_mib=16
mode=download
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) dest=${2:?--dest needs a folder}; shift 2 ;;
    --python-version) python_version=${2:?--python-version needs a version like 3.12}; shift 2 ;;
    --max-mib) max_mib=${2:?--max-mib needs a number}; shift 2 ;;
    --check) mode=check; dest=${2:?--check needs a folder}; shift 2 ;;
    --list) mode=list; shift ;;
    --dry-run) mode=dry-run; shift ;;
    -h | --help) usage 0 ;;
    *) echo "gpu_wheels.sh: unknown argument '$1'" >&2; usage 2 ;;
  esac
done
if ! [[ "$python_version" =~ ^3\.[0-9]+$ ]]; then
  echo "gpu_wheels.sh: --python-version '$python_version' is not like 3.12" >&2
  exit 2
fi
if ! [[ "$max_mib" =~ ^[0-9]+$ ]]; then
  echo "gpu_wheels.sh: --max-mib '$max_mib' is not a whole number" >&2
  exit 2
fi
abi="cp${python_version/./}"

# Every file in $dest must be a wheel for this interpreter (pure Python or $abi manylinux
# x86_64), and all of them together at most $max_mib MiB.
check() {
  local bad=() total=0 file name size
  shopt -s nullglob
  for file in "$dest"/*; do
    name=$(basename "$file")
    size=$(stat -c %s "$file")
    total=$((total + size))
    printf '%8d KiB  %s\n' $((size / 1024)) "$name"
    case "$name" in
      *-py3-none-any.whl | *-py2.py3-none-any.whl) ;;
      *-"$abi"-"$abi"-*manylinux*x86_64*.whl | *-"$abi"-abi3-*manylinux*x86_64*.whl) ;;
      *) bad+=("$name") ;;
    esac
  done
  printf '%8d KiB  total in %s (budget %d MiB)\n' $((total / 1024)) "$dest" "$max_mib"
  if [ ${#bad[@]} -gt 0 ]; then
    echo "gpu_wheels.sh: not a pure-Python or $abi manylinux x86_64 wheel: ${bad[*]}" >&2
    return 1
  fi
  if [ "$total" -gt $((max_mib * 1024 * 1024)) ]; then
    echo "gpu_wheels.sh: $dest holds more than $max_mib MiB: it would not travel" >&2
    return 1
  fi
}

read -r -a pip <<<"${PIP:-python3 -m pip}"
command=(
  "${pip[@]}" download --no-deps --only-binary=:all: --dest "$dest"
  --python-version "$python_version" --implementation cp --abi "$abi"
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64
  "${WHEELS[@]}"
)
case "$mode" in
  list) printf '%s\n' "${WHEELS[@]}" ;;
  dry-run) printf '%q ' "${command[@]}"; echo ;;
  check) check ;;
  download)
    mkdir -p "$dest"
    "${command[@]}"
    check
    ;;
esac
