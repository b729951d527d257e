"""Running servers for tests: an ASGI app in a thread, or `da3-serverless serve` as a process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import uvicorn

START_TIMEOUT_S = 300  # a cold model load on a busy 2-core machine
SRC = Path(__file__).resolve().parents[1] / "src"


def eventually(condition: Callable[[], object], timeout_s: float = 60, what: str = "") -> None:
    """Poll `condition` until it is true; fail (never hang) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def app_in_thread(app) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 in a background thread; yields the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def serve_command(*args: str) -> list[str]:
    """`da3-serverless serve ...` with this interpreter (works before the package is installed)."""
    return [sys.executable, "-c", "import sys; from da3_serverless.cli import main; "
            "sys.exit(main(sys.argv[1:]))", *args]  # fmt: skip


@contextlib.contextmanager
def serve_process(
    env: dict[str, str], log_path: Path, *args: str, src: Path = SRC
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`da3-serverless serve` on a free port until /ready says 200; yields (URL, process).
    The process's output goes to `log_path` (shown when it fails to start); `src` is the code
    it runs (this checkout's by default)."""
    port = free_port()
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            serve_command("serve", "--host", "127.0.0.1", "--port", str(port), *args),
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_ready(
    url: str, process: subprocess.Popen | None, log_path: Path | None, path: str = "/ready"
) -> None:
    """Until GET `url + path` answers 200; fails with the process's log if it exits or takes
    longer than START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        time.sleep(0.3)
    output = log_path.read_text(errors="replace")[-5000:] if log_path else ""
    raise RuntimeError(f"server at {url} did not become ready:\n{output}")


@contextlib.contextmanager
def runpod_local_api(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """RunPod's local test API (`python -m da3_serverless.runpod_worker --rp_serve_api`) on a
    free port, once it answers (its docs page is at `/`); yields the base URL."""
    with runpod_local_process(env, log_path) as (url, _):
        yield url


@contextlib.contextmanager
def runpod_local_process(
    env: dict[str, str], log_path: Path, src: Path = SRC
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`runpod_local_api`, yielding (URL, process); `src` is the code it runs."""
    port = free_port()
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "da3_serverless.runpod_worker", "--rp_serve_api",
               "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path, path="/")
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
