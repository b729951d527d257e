"""scripts/bootstrap.sh, prefetch.sh and healthcheck.sh, run for real in temporary folders.

The `da3-serverless` CLI and the worker are replaced (DA3_CLI, DA3_WORKER_CMD) by stub scripts
that record their arguments, a few environment variables and their PID, so the tests see what
bootstrap would run and that it `exec`s the worker. Temporary folders stand in for the network
volume. A read-only volume needs an unprivileged user (root may write anywhere, and so would
both `test -w` and Python's os.access): as root, that case runs under `setpriv` as nobody.
"""

from __future__ import annotations

import http.server
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from da3_serverless.config import Settings

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
RECORDED_ENV = ("WORKSPACE", "HF_HOME", "MODEL_ID", "PORT", "WARMUP", "DA3_READY_FILE")

STUB = """#!/usr/bin/env bash
# Test stand-in: records how it was called, then fails if asked to.
set -euo pipefail
{
    echo "CALL $(basename "$0") $$ $(id -u)"
    for arg in "$@"; do echo "ARG $arg"; done
    for name in RECORDED; do echo "ENV $name=${!name-<unset>}"; done
} >>"$STUB_LOG"
if [[ $# -gt 0 && " ${STUB_FAIL:-} " == *" $1 "* ]]; then
    echo "stub: failing '$1' as asked" >&2
    exit 7
fi
""".replace("RECORDED", " ".join(RECORDED_ENV))


@dataclass
class Call:
    command: str
    pid: int
    uid: int
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Sandbox:
    """A temporary root with stubs, a stand-in volume and a fallback workspace."""

    root: Path

    @property
    def log(self) -> Path:
        return self.root / "calls.log"

    @property
    def volume(self) -> Path:
        return self.root / "runpod-volume"

    @property
    def fallback(self) -> Path:
        return self.root / "workspace" / "DA3-Serverless"

    @property
    def ready_file(self) -> Path:
        return self.root / "ready"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            "PATH": os.environ["PATH"],
            "STUB_LOG": str(self.log),
            "DA3_CLI": str(self.root / "bin" / "da3-serverless"),
            "DA3_WORKER_CMD": str(self.root / "bin" / "worker"),
            "DA3_FALLBACK_WORKSPACE": str(self.fallback),
            "DA3_READY_FILE": str(self.ready_file),
            "RUNPOD_VOLUME": str(self.volume),
        }
        env.update(overrides)
        return env

    def calls(self) -> list[Call]:
        calls: list[Call] = []
        if not self.log.exists():
            return calls
        for line in self.log.read_text().splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "CALL":
                command, pid, uid = rest.split(" ")
                calls.append(Call(command, int(pid), int(uid)))
            elif kind == "ARG":
                calls[-1].args.append(rest)
            elif kind == "ENV":
                name, _, value = rest.partition("=")
                calls[-1].env[name] = value
        return calls


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    # Not pytest's tmp_path: that is private to root, and one test runs as nobody.
    root = Path(tempfile.mkdtemp(prefix="da3-bootstrap-"))
    try:
        root.chmod(0o777)
        (root / "bin").mkdir(mode=0o755)
        (root / "calls.log").touch(mode=0o666)  # the server stub may run as nobody
        (root / "calls.log").chmod(0o666)
        for name in ("da3-serverless", "worker"):
            stub = root / "bin" / name
            stub.write_text(STUB)
            stub.chmod(0o755)
        yield Sandbox(root)
    finally:
        shutil.rmtree(root)


def run_script(
    name: str, env: dict[str, str], *args: str, user: list[str] | None = None, where: Path = SCRIPTS
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run <where>/<name> with exactly `env`; returns the result and the process's PID."""
    command = [*(user or []), "bash", str(where / name), *args]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr), proc.pid


def assert_passed_to_python(chosen: Path, sandbox: Sandbox) -> None:
    """The Python side guesses nothing: it takes the workspace bootstrap chose from WORKSPACE."""
    worker = sandbox.calls()[-1]
    assert worker.env["WORKSPACE"] == str(chosen)
    settings = Settings(workspace=Path(worker.env["WORKSPACE"]))
    assert (settings.workspace_dir, settings.workspace_reason) == (chosen, "WORKSPACE is set")


# --- workspace selection ----------------------------------------------------------------------


def test_writable_volume_becomes_the_workspace_and_the_worker_is_execed(sandbox: Sandbox) -> None:
    sandbox.volume.mkdir()
    result, pid = run_script("bootstrap.sh", sandbox.env(), "--rp_serve_api", "--rp_log_level=INFO")
    assert result.returncode == 0, result.stderr

    workspace = sandbox.volume / "DA3-Serverless"
    for sub in ("cache", "models", "output_images"):
        assert (workspace / sub).is_dir()
    assert_passed_to_python(workspace, sandbox)

    prune, prefetch, worker = sandbox.calls()
    assert (prune.command, prune.args) == ("da3-serverless", ["prune"])
    assert (prefetch.command, prefetch.args) == ("da3-serverless", ["prefetch"])
    assert worker.command == "worker"
    assert worker.args == ["--rp_serve_api", "--rp_log_level=INFO"]
    assert worker.pid == pid  # exec: the worker replaced bootstrap, so it gets the signals
    for call in (prune, prefetch, worker):
        assert call.env["WORKSPACE"] == str(workspace)
        assert call.env["HF_HOME"] == str(workspace / "cache")
        assert call.env["MODEL_ID"] == "<unset>"  # config.py's default applies
    # The worker writes the ready file once its model is warm; bootstrap only names it.
    assert worker.env["DA3_READY_FILE"] == str(sandbox.ready_file)
    assert not sandbox.ready_file.exists()


@pytest.mark.parametrize("kind", ["missing", "regular file"])
def test_no_usable_volume_falls_back(sandbox: Sandbox, kind: str) -> None:
    if kind == "regular file":
        sandbox.volume.write_text("not a mount")
    result, _ = run_script("bootstrap.sh", sandbox.env())
    assert result.returncode == 0, result.stderr

    assert (sandbox.fallback / "output_images").is_dir()
    assert_passed_to_python(sandbox.fallback, sandbox)
    worker = sandbox.calls()[-1]
    assert worker.command == "worker"
    assert worker.env["WORKSPACE"] == str(sandbox.fallback)
    assert not (sandbox.volume / "DA3-Serverless").exists()


def test_read_only_volume_falls_back(sandbox: Sandbox) -> None:
    sandbox.volume.mkdir()
    sandbox.volume.chmod(0o555)
    user: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: no unprivileged user to test with")
        user = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    # A copy nobody can read, wherever the checkout lives.
    shutil.copy(SCRIPTS / "bootstrap.sh", sandbox.root / "bin")
    result, _ = run_script("bootstrap.sh", sandbox.env(), user=user, where=sandbox.root / "bin")
    assert result.returncode == 0, result.stderr

    assert (sandbox.fallback / "cache").is_dir()
    assert not (sandbox.volume / "DA3-Serverless").exists()
    assert sandbox.calls()[-1].env["WORKSPACE"] == str(sandbox.fallback)


def test_workspace_and_hf_home_set_by_the_user_win(sandbox: Sandbox) -> None:
    sandbox.volume.mkdir()
    mine = sandbox.root / "mine"
    hf_home = sandbox.root / "hf"
    env = sandbox.env(WORKSPACE=str(mine), HF_HOME=str(hf_home), MODEL_ID="da3-small")
    result, _ = run_script("bootstrap.sh", env)
    assert result.returncode == 0, result.stderr

    assert (mine / "models").is_dir()
    assert_passed_to_python(mine, sandbox)
    assert not (sandbox.volume / "DA3-Serverless").exists()
    worker = sandbox.calls()[-1]
    assert worker.env == {
        "WORKSPACE": str(mine),
        "HF_HOME": str(hf_home),
        "MODEL_ID": "da3-small",
        "PORT": "<unset>",
        "WARMUP": "<unset>",
        "DA3_READY_FILE": str(sandbox.ready_file),
    }


def test_baked_model_is_the_default_model_and_cache(sandbox: Sandbox) -> None:
    baked = sandbox.root / "baked-hf"
    env = sandbox.env(DA3_BAKED_MODEL_ID="depth-anything/DA3-SMALL", DA3_BAKED_HF_HOME=str(baked))
    result, _ = run_script("bootstrap.sh", env)
    assert result.returncode == 0, result.stderr
    worker = sandbox.calls()[-1]
    assert worker.env["MODEL_ID"] == "depth-anything/DA3-SMALL"
    assert worker.env["HF_HOME"] == str(baked)

    # The user's own choices still win over the baked ones.
    sandbox.log.unlink()
    env.update(MODEL_ID="da3-base", HF_HOME=str(sandbox.root / "hf"))
    result, _ = run_script("bootstrap.sh", env)
    assert result.returncode == 0, result.stderr
    worker = sandbox.calls()[-1]
    assert (worker.env["MODEL_ID"], worker.env["HF_HOME"]) == ("da3-base", str(sandbox.root / "hf"))


# --- warmup, prune, modes ---------------------------------------------------------------------


def test_missing_weights_stop_before_the_worker(sandbox: Sandbox) -> None:
    result, _ = run_script("bootstrap.sh", sandbox.env(STUB_FAIL="prefetch"))
    assert result.returncode == 7
    assert "weights of the default model could not be found or downloaded (exit 7" in (
        result.stderr
    )
    assert [c.args for c in sandbox.calls()] == [["prune"], ["prefetch"]]
    assert not sandbox.ready_file.exists()


@pytest.mark.parametrize("value", ["0", "false", "No", "OFF"])
def test_warmup_can_be_skipped(sandbox: Sandbox, value: str) -> None:
    result, _ = run_script("bootstrap.sh", sandbox.env(WARMUP=value))
    assert result.returncode == 0, result.stderr
    assert "skips its warmup" in result.stderr
    worker = sandbox.calls()[-1]
    assert worker.command == "worker" and worker.env["WARMUP"] == value


def test_bad_settings_are_refused_before_anything_runs(sandbox: Sandbox) -> None:
    result, _ = run_script("bootstrap.sh", sandbox.env(WARMUP="maybe"))
    assert result.returncode == 1
    assert "WARMUP must be a boolean" in result.stderr
    result, _ = run_script("bootstrap.sh", sandbox.env(SERVE_MODE="grpc"))
    assert result.returncode == 1
    assert "SERVE_MODE must be 'runpod' or 'http'" in result.stderr
    assert sandbox.calls() == []


def test_failed_prune_is_a_warning(sandbox: Sandbox) -> None:
    result, _ = run_script("bootstrap.sh", sandbox.env(STUB_FAIL="prune"))
    assert result.returncode == 0, result.stderr
    assert "pruning old outputs" in result.stderr
    assert [c.command for c in sandbox.calls()][-1] == "worker"


def test_unwritable_workspace_fails_loudly(sandbox: Sandbox) -> None:
    blocker = sandbox.root / "blocker"
    blocker.write_text("a file where the workspace should be")
    result, _ = run_script("bootstrap.sh", sandbox.env(WORKSPACE=str(blocker / "ws")))
    assert result.returncode == 1
    assert f"cannot create cache/, models/ and output_images/ under {blocker}/ws" in result.stderr
    assert sandbox.calls() == []


def test_http_mode_execs_the_server_on_all_interfaces(sandbox: Sandbox) -> None:
    env = sandbox.env(SERVE_MODE="http", PORT="8123", DA3_RUN_AS="65534:65534")
    result, pid = run_script("bootstrap.sh", env, "--x")
    assert result.returncode == 0, result.stderr
    server = sandbox.calls()[-1]
    assert server.command == "da3-serverless"
    assert server.args == ["serve", "--host", "0.0.0.0", "--port", "8123", "--x"]
    assert server.pid == pid


def test_http_server_drops_root_and_owns_the_workspace(sandbox: Sandbox) -> None:
    """As root, the server runs as DA3_RUN_AS (the image's da3 user by default) and the
    workspace is its own; the RunPod worker keeps root (RunPod's volumes are root-owned)."""
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs a test run as root")
    sandbox.volume.mkdir()
    env = sandbox.env(SERVE_MODE="http", DA3_RUN_AS="65534:65534")
    result, pid = run_script("bootstrap.sh", env)
    assert result.returncode == 0, result.stderr
    prune, prefetch, server = sandbox.calls()
    assert (prune.uid, prefetch.uid) == (0, 0)  # before the drop: they may need root
    assert (server.command, server.uid, server.pid) == ("da3-serverless", 65534, pid)
    workspace = sandbox.volume / "DA3-Serverless"
    for folder in (workspace, workspace / "cache", workspace / "output_images"):
        assert (folder.stat().st_uid, folder.stat().st_gid) == (65534, 65534), folder

    sandbox.log.write_text("")
    result, _ = run_script("bootstrap.sh", sandbox.env(DA3_RUN_AS="65534:65534"))
    assert result.returncode == 0, result.stderr
    assert [(c.command, c.uid) for c in sandbox.calls()][-1] == ("worker", 0)

    result, _ = run_script("bootstrap.sh", sandbox.env(SERVE_MODE="http", DA3_RUN_AS="nobody"))
    assert result.returncode == 1
    assert "DA3_RUN_AS must be uid:gid, not 'nobody'" in result.stderr


def test_prefetch_passes_its_arguments_on(sandbox: Sandbox) -> None:
    result, pid = run_script("prefetch.sh", sandbox.env(), "da3-small", "da3-base")
    assert result.returncode == 0, result.stderr
    (call,) = sandbox.calls()
    assert (call.command, call.args, call.pid) == (
        "da3-serverless",
        ["prefetch", "da3-small", "da3-base"],
        pid,
    )

    result, _ = run_script("prefetch.sh", sandbox.env(STUB_FAIL="prefetch"))
    assert result.returncode == 7


# --- healthcheck ------------------------------------------------------------------------------


def test_healthcheck_for_the_worker_follows_its_ready_file(sandbox: Sandbox) -> None:
    env = sandbox.env()
    result, _ = run_script("healthcheck.sh", env)
    assert result.returncode == 1
    assert "not ready" in result.stderr

    result, _ = run_script("bootstrap.sh", env)
    assert result.returncode == 0, result.stderr
    result, _ = run_script("healthcheck.sh", env)
    assert result.returncode == 1  # the (stub) worker has not loaded a model
    sandbox.ready_file.write_text("2026-01-01T00:00:00Z")  # what the worker writes when warm
    result, _ = run_script("healthcheck.sh", env)
    assert result.returncode == 0, result.stderr


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:
        code = type(self).status if self.path == "/ready" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_healthcheck_over_http_asks_the_server(sandbox: Sandbox) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = sandbox.env(SERVE_MODE="http", PORT=str(server.server_address[1]))
        _Ready.status = 503
        result, _ = run_script("healthcheck.sh", env)
        assert result.returncode == 1
        assert "503" in result.stderr
        _Ready.status = 200
        result, _ = run_script("healthcheck.sh", env)
        assert result.returncode == 0, result.stderr
    finally:
        server.shutdown()
        server.server_close()

    result, _ = run_script("healthcheck.sh", env)  # nothing listens any more
    assert result.returncode == 1


def test_scripts_are_executable() -> None:
    for name in ("bootstrap.sh", "prefetch.sh", "healthcheck.sh", "lock.sh"):
        assert (SCRIPTS / name).stat().st_mode & stat.S_IXUSR, name
