#!/usr/bin/env bash
# Downloads model snapshots into the Hugging Face cache ahead of time:
#   scripts/prefetch.sh [MODEL_ID ...]        (default: $MODEL_ID, else config.py's default)
# Run it with the same WORKSPACE / HF_HOME as the worker (e.g. on a pod with the network volume
# mounted) so that cold starts find the weights instead of downloading them.
# DA3_CLI replaces the da3-serverless executable (tests use a stub).
set -euo pipefail

read -r -a cli <<<"${DA3_CLI:-da3-serverless}"
exec "${cli[@]}" prefetch "$@"
