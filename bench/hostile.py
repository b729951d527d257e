"""Hostile inputs against the running service: for every case of `tests/hostile_cases.py`, the
answer (status, error code), the time to answer, the server's peak memory growth and the files
a failed request left under `output_images/`, through the self-hosted server and RunPod's local
API. Prints a markdown table; asserts nothing.

    python bench/hostile.py                                  # this checkout's code
    python bench/hostile.py --src /tmp/before-hostile/src    # another checkout's code
    python bench/hostile.py --only downloads,cameras --transports http

The servers run a random-weight da3-small on CPU (offline, a temporary workspace), with
DOWNLOAD_TIMEOUT_S=4 and MAX_DOWNLOAD_BYTES=8000000; payloads and a hostile HTTP server on
127.0.0.1 come from `tests/hostile_cases.py`. Peak memory growth is VmHWM after the case minus
the resident size when it started (reset by writing 5 to /proc/<pid>/clear_refs), so run it on
a quiet Linux machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the cases live there

import hostile_cases as hc
from common import REPO, snapshot
from conftest import SMALL_REPO, TEST_API_KEY, place_in_hf_cache
from servers import free_port, runpod_local_process, serve_process


def base_env(hf_home: Path, workspace: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DA3_", "HF_", "RUNPOD"))}
    env.update(
        HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", WORKSPACE=str(workspace),
        RUNPOD_VOLUME=str(workspace / "no-volume"), MODEL_ID=SMALL_REPO, DA3_API_KEY=TEST_API_KEY,
        DA3_DEVICE="cpu", PYTHONUNBUFFERED="1", **hc.server_settings_env(),
    )  # fmt: skip
    return env


@contextlib.contextmanager
def server(kind: str, env: dict[str, str], src: Path, logs: Path) -> Iterator[tuple[str, int]]:
    """(URL, pid) of a running server: "http", "strict" (private addresses refused) or
    "runpod"."""
    if kind == "runpod":
        context = runpod_local_process({**env, "DA3_ALLOW_PRIVATE_URLS": "1"}, logs, src=src)
    else:
        private = "0" if kind == "strict" else "1"
        context = serve_process({**env, "DA3_ALLOW_PRIVATE_URLS": private}, logs, src=src)
    with context as (url, process):
        yield url, process.pid


def outputs(workspace: Path) -> set[str]:
    folder = workspace / "output_images"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def run(kind: str, cases: list[hc.Case], src: Path, hf_home: Path, ctx: hc.Context) -> None:
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        workspace = Path(tmp) / "workspace"
        with server(kind, base_env(hf_home, workspace), src, Path(tmp) / "server.log") as (
            url,
            pid,
        ):
            for case in cases:
                before = outputs(workspace)
                try:
                    answer = hc.measure(case, url, pid, ctx, runpod=kind == "runpod")
                except Exception as error:  # a crash is a figure too
                    print(f"| {case.group} | {case.name} | {kind} | {type(error).__name__} |")
                    continue
                left = len(outputs(workspace) - before) if answer.code else 0
                expected = " ".join(map(str, case.expected(kind == "runpod")))
                got = f"{answer.status} {answer.code or ''}".strip()
                polls = f" (/status {set(answer.http_statuses)})" if case.run else ""
                print(
                    f"| {case.group} | {case.name} | {kind} | {got}{polls} | {expected} | "
                    f"{answer.seconds:.2f} | {answer.growth_mb:+.0f} | {left} |",
                    flush=True,
                )
            good_case = hc.Case("good", "", hc.good_camera_request, 200, None)
            good = hc.measure(good_case, url, pid, ctx, runpod=kind == "runpod")
            print(f"| | a good request afterwards | {kind} | {good.status} | 200 | "
                  f"{good.seconds:.2f} | {good.growth_mb:+.0f} | |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the code to serve")
    parser.add_argument("--only", default="", help="comma-separated groups (default: all)")
    parser.add_argument("--transports", default="http,runpod", help="http and/or runpod")
    args = parser.parse_args()
    groups = set(filter(None, args.only.split(",")))
    cases = [c for c in hc.CASES if not groups or c.group in groups]
    with tempfile.TemporaryDirectory(prefix="hostile-hf-") as hf_home:
        place_in_hf_cache(snapshot("da3-small"), Path(hf_home), SMALL_REPO)
        print(f"code: {args.src}")
        print("| class | case | transport | answer | expected | seconds | peak +MB | files left |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        with hc.serve_hostile() as hostile_url:
            ctx = hc.Context(TEST_API_KEY, hostile_url, port=free_port())
            for kind in args.transports.split(","):
                chosen = [c for c in cases if not c.strict and (kind != "runpod" or c.runpod)]
                if chosen:
                    run(kind, chosen, args.src, Path(hf_home), ctx)
                strict = [c for c in cases if c.strict and kind == "http"]
                if strict:
                    run("strict", strict, args.src, Path(hf_home), ctx)


if __name__ == "__main__":
    main()
