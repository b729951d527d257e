#!/usr/bin/env bash
# The image's HEALTHCHECK; exit 0 when healthy.
# SERVE_MODE=http: the server's own readiness, GET /ready on PORT (200 once the model is loaded).
# RunPod worker (default): the worker has no HTTP port, so the honest signal is the file
# DA3_READY_FILE that the worker writes once its model is loaded and warm (bootstrap.sh removes
# it at start). The worker's liveness needs no probe: it is the container's main process, so
# the container stops when it exits. RunPod itself does not act on this status.
set -euo pipefail

if [[ "${SERVE_MODE:-runpod}" == http ]]; then
    exec python3 - "http://127.0.0.1:${PORT:-8000}/ready" <<'PY'
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as error:  # refused, timed out, or an HTTP error status such as 503
    print(f"not ready: {error}", file=sys.stderr)
    sys.exit(1)
PY
fi

ready_file="${DA3_READY_FILE:-/tmp/da3-serverless.ready}"
if [[ ! -f "$ready_file" ]]; then
    echo "not ready: $ready_file is missing (the worker has not loaded its model yet)" >&2
    exit 1
fi
