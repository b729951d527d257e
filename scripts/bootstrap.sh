#!/usr/bin/env bash
# Container entry point: prepare the workspace, prune old outputs, make sure the model's weights
# are on disk (prefetch), then exec the RunPod worker (or, with SERVE_MODE=http, the
# self-hosted server) so that it receives the container's signals directly. The worker loads and
# warms the model in its own process before the first job and exits non-zero if that fails: a
# warmup in a separate process would load the weights twice and leave nothing warm behind.
# Arguments are passed on to the worker / server.
#
# Environment (all optional):
#   WORKSPACE      workspace folder. Default: $RUNPOD_VOLUME/DA3-Serverless when RUNPOD_VOLUME
#                  (default /runpod-volume) is a folder this user can write to, else
#                  /workspace/DA3-Serverless; passed on as WORKSPACE (outside the image the
#                  Python default is a per-user folder, config.py).
#   HF_HOME        Hugging Face cache. Default: the model cache baked into the image, if any,
#                  else $WORKSPACE/cache. A value set by the user is kept as it is.
#   MODEL_ID       model to serve. Default: the baked model, if any, else config.py's default.
#   WARMUP         0/false/no/off/n/f: the worker skips its warmup forward pass (pydantic's
#                  booleans; checked here so a typo fails before anything starts).
#   SERVE_MODE     runpod (default) or http; PORT: the HTTP port (default 8000).
#   DA3_RUN_AS     uid:gid the HTTP server runs as when bootstrap starts as root (default
#                  10001:10001, the image's `da3` user): the workspace is handed to it first.
#                  The RunPod worker keeps root: RunPod's network volumes are root-owned.
# Set by the image, not by users:
#   DA3_BAKED_MODEL_ID, DA3_BAKED_HF_HOME   the model baked in at build time (MODEL_ID build arg).
#   DA3_READY_FILE   written by the worker once its model is loaded and warm;
#                    scripts/healthcheck.sh looks for it.
# Replaced by tests (stubs that record what they were called with):
#   DA3_CLI (default: da3-serverless), DA3_WORKER_CMD (default: python -m
#   da3_serverless.runpod_worker), DA3_FALLBACK_WORKSPACE (default: /workspace/DA3-Serverless).
set -euo pipefail

log() { echo "bootstrap: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

read -r -a cli <<<"${DA3_CLI:-da3-serverless}"
read -r -a worker <<<"${DA3_WORKER_CMD:-python -m da3_serverless.runpod_worker}"
export DA3_READY_FILE="${DA3_READY_FILE:-/tmp/da3-serverless.ready}"
rm -f "$DA3_READY_FILE"

serve_mode="${SERVE_MODE:-runpod}"
case "$serve_mode" in
    runpod | http) ;;
    *) die "SERVE_MODE must be 'runpod' or 'http', not '$serve_mode'" ;;
esac

# Same truth values as pydantic, which parses WARMUP for the Python side.
warmup="${WARMUP:-1}"
case "${warmup,,}" in
    1 | on | t | true | y | yes) warmup=1 ;;
    0 | off | f | false | n | no) warmup=0 ;;
    *) die "WARMUP must be a boolean (1/0, true/false, yes/no, on/off), not '$warmup'" ;;
esac

# --- workspace --------------------------------------------------------------------------------
volume="${RUNPOD_VOLUME:-/runpod-volume}"
if [[ -n "${WORKSPACE:-}" ]]; then
    workspace="$WORKSPACE"
elif [[ -d "$volume" && -w "$volume" ]]; then
    workspace="$volume/DA3-Serverless"
else
    workspace="${DA3_FALLBACK_WORKSPACE:-/workspace/DA3-Serverless}"
fi
mkdir -p "$workspace/cache" "$workspace/models" "$workspace/output_images" ||
    die "cannot create cache/, models/ and output_images/ under $workspace (set WORKSPACE)"
export WORKSPACE="$workspace"

baked_model="${DA3_BAKED_MODEL_ID:-}"
if [[ -z "${HF_HOME:-}" ]]; then
    if [[ -n "$baked_model" ]]; then
        export HF_HOME="${DA3_BAKED_HF_HOME:?the image sets DA3_BAKED_HF_HOME with the model}"
    else
        export HF_HOME="$workspace/cache"
    fi
fi
if [[ -z "${MODEL_ID:-}" && -n "$baked_model" ]]; then
    export MODEL_ID="$baked_model"
fi
log "workspace $WORKSPACE, HF_HOME $HF_HOME, model ${MODEL_ID:-(default)}, mode $serve_mode"

# --- housekeeping and weights -------------------------------------------------------------------
# Old outputs only take space: a failed prune is worth a warning, not a dead worker.
if ! "${cli[@]}" prune; then
    log "warning: pruning old outputs in $WORKSPACE/output_images failed; continuing"
fi

status=0
"${cli[@]}" prefetch || status=$?
if [[ "$status" != 0 ]]; then
    log "error: the weights of ${MODEL_ID:-the default model} could not be found or downloaded" \
        "(exit $status, see above); the worker was not started. Check MODEL_ID, HF_TOKEN," \
        "HF_HUB_OFFLINE and the network volume."
    exit "$status"
fi
if [[ "$warmup" == 0 ]]; then
    log "WARMUP=$WARMUP: the worker loads the model but skips its warmup forward pass"
fi

# --- hand over ------------------------------------------------------------------------------------
if [[ "$serve_mode" == http ]]; then
    # A server facing the network needs no root: drop to an unprivileged user, who owns the
    # workspace (outputs, downloads, compile cache). Baked weights stay root-owned and readable.
    drop=()
    if [[ "$(id -u)" == 0 ]]; then
        run_as="${DA3_RUN_AS:-10001:10001}"
        [[ "$run_as" =~ ^[0-9]+:[0-9]+$ ]] || die "DA3_RUN_AS must be uid:gid, not '$run_as'"
        chown -R "$run_as" "$workspace" || die "cannot hand $workspace to $run_as"
        drop=(setpriv --reuid="${run_as%:*}" --regid="${run_as#*:}" --clear-groups)
        log "the server runs as uid:gid $run_as"
    fi
    exec "${drop[@]}" "${cli[@]}" serve --host 0.0.0.0 --port "${PORT:-8000}" "$@"
fi
exec "${worker[@]}" "$@"
