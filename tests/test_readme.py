"""The README cannot rot: its examples run for real and its tables match the code.

Code blocks whose info string carries `readme-test` are run as written: bash blocks with bash
(the real curl, `da3-serverless` from this interpreter's bin folder), Python blocks with `exec`
in a fresh namespace, each in a working folder holding `photo.jpg` (a JPEG of a shared test
photo), with the environment the README tells users to set (`DA3_ENDPOINT`, `DA3_API_KEY`,
`RUNPOD_API_KEY`). They talk to a self-hosted server and to RunPod's local test API, both serving
a random-weight da3-small offline. The one change made to the text: the default model's repo id
becomes DA3-SMALL's (the giant's random weights are too large to build here).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import SMALL_REPO, TEST_API_KEY
from da3_serverless.api.errors import STATUS_BY_CODE
from da3_serverless.api.schema import OUTPUT_NAMES, RunRequest, RunResponse
from da3_serverless.cli import build_parser
from da3_serverless.config import DEFAULT_MODEL_ID, Settings
from da3_serverless.exports.encoding import decode_depth_png16
from da3_serverless.inference.catalog import MODELS
from paths import IMAGES, REPO
from servers import free_port, runpod_local_api, serve_process, wait_ready

README = (REPO / "README.md").read_text()
MARKER = "readme-test"
PHOTO_SIZE = (680, 1208)  # (H, W) of soh-000.png


def require(*tools: str) -> None:
    """Skip when a tool the examples use is missing (fail under CI, which installs them)."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        message = f"not on PATH: {', '.join(missing)} (apt-get install -y {' '.join(missing)})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@dataclass(frozen=True)
class Example:
    language: str
    code: str


def marked_examples() -> list[Example]:
    """Every fenced block whose info string holds MARKER, in README order."""
    blocks = re.findall(r"^```(\w+)([^\n]*)\n(.*?)^```", README, flags=re.M | re.S)
    return [Example(lang, code) for lang, info, code in blocks if MARKER in info.split()]


def example(language: str, contains: str) -> Example:
    """The one marked example in `language` whose code contains `contains`."""
    found = [e for e in marked_examples() if e.language == language and contains in e.code]
    assert len(found) == 1, f"expected one {language} example with {contains!r}, got {found}"
    return found[0]


# Each marked example, by a string that identifies it; every one is run by a test below.
QUICK_START = ("bash", "http://127.0.0.1:8000/runsync")
RUNPOD_CURL = ("bash", "RUNPOD_API_KEY")
SELF_HOSTED_CURL = ("bash", '"outputs": ["depth", "preview"]')
DECODE_PNG = ("python", "response.json")
CLIENT = ("python", "from da3_serverless import Client")
REQUEST_CLI = ("bash", "da3-serverless request")
PREDICT_CLI = ("bash", "da3-serverless predict")
LIBRARY = ("python", "Predictor.from_pretrained")
RUNPOD_SDK = ("python", "runpod.Endpoint")
ALL_EXAMPLES = (QUICK_START, RUNPOD_CURL, SELF_HOSTED_CURL, DECODE_PNG, CLIENT, REQUEST_CLI,
                PREDICT_CLI, LIBRARY, RUNPOD_SDK)  # fmt: skip


def code_of(key: tuple[str, str], url: str | None = None) -> str:
    """The example's code for the random DA3-SMALL; with `url`, that server instead of `make
    serve`'s default address."""
    code = example(*key).code.replace(DEFAULT_MODEL_ID, SMALL_REPO)
    code = code.replace(".venv/bin/", f"{Path(sys.executable).parent}/")  # the venv's programs
    return code.replace("http://127.0.0.1:8000", url) if url else code


def make_workdir(tmp_path: Path) -> Path:
    """A folder with `photo.jpg`, as a user would have."""
    work = tmp_path / "work"
    work.mkdir()
    with Image.open(IMAGES / "soh-000.png") as photo:
        photo.convert("RGB").save(work / "photo.jpg", quality=92)
    return work


def example_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    """`base` plus `extra`, with this interpreter's bin folder (da3-serverless) first on PATH."""
    env = {**base, **extra}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def run_bash(
    key: tuple[str, str], workdir: Path, env: dict[str, str], url: str | None = None
) -> None:
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", code_of(key, url)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, f"{key} failed:\n{result.stdout}\n{result.stderr}"


def run_python(key: tuple[str, str], workdir: Path, env: dict[str, str], monkeypatch) -> dict:
    """Exec the example in `workdir` with exactly the service variables of `env`; returns its
    namespace, so the test can look at what it computed."""
    for name in list(os.environ):
        if name.startswith(("DA3_", "HF_", "RUNPOD")) or name in ("MODEL_ID", "WORKSPACE"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code_of(key), f"README.md:{key[1]}", "exec"), namespace)
    return namespace


# --- the examples -----------------------------------------------------------------------------


def test_every_marked_example_is_run():
    claimed = [example(*key) for key in ALL_EXAMPLES]
    assert sorted(map(repr, claimed)) == sorted(map(repr, marked_examples()))


def check_response(body: dict) -> dict:
    """Checks of a v1 response as the README describes it; returns it."""
    assert body["schema_version"] == "1" and body["model_id"] == SMALL_REPO
    assert (body["height"], body["width"]) == PHOTO_SIZE
    assert body["depth_encoding"] == "png16-linear" and body["units"] == "relative"
    assert np.asarray(body["intrinsics"]).shape == (3, 3)
    assert np.asarray(body["extrinsics"]).shape == (3, 4)
    return body


def check_decode_example(workdir: Path, env: dict[str, str], monkeypatch) -> None:
    """The PNG decoding example on `response.json`, against the library's decoder."""
    answer = json.loads((workdir / "response.json").read_text())
    body = check_response(answer.get("output", answer))
    decoded = run_python(DECODE_PNG, workdir, env, monkeypatch)
    png = base64.b64decode(body["image_base64"])
    expected = decode_depth_png16(png, body["min_depth"], body["max_depth"])
    assert decoded["depth"].shape == PHOTO_SIZE
    np.testing.assert_allclose(decoded["depth"], expected, rtol=1e-6, atol=1e-6)
    assert decoded["K"][0, 0] == body["intrinsics"][0][0]


def check_client_example(workdir: Path, env: dict[str, str], monkeypatch) -> None:
    result = run_python(CLIENT, workdir, env, monkeypatch)["result"]
    assert result.depth.shape == PHOTO_SIZE and result.depth.dtype == np.float32
    assert "depth_npy" in result.outputs and result.units == "relative"
    from_png = decode_depth_png16(result.depth_png)
    step = (result.max_depth - result.min_depth) / 65535
    assert np.abs(from_png - result.depth).max() <= step * 0.501 + 1e-6 * result.max_depth
    with Image.open(workdir / "preview.png") as preview:
        assert preview.size == PHOTO_SIZE[::-1] and preview.mode == "RGB"


def check_runpod_sdk_example(workdir: Path, env: dict[str, str], monkeypatch) -> None:
    """RunPod's SDK against the self-hosted server's `/v2` paths."""
    import runpod

    for name in ("api_key", "endpoint_url_base"):  # the example sets them; put them back after
        monkeypatch.setattr(runpod, name, getattr(runpod, name))
    namespace = run_python(RUNPOD_SDK, workdir, env, monkeypatch)
    check_response(namespace["output"])
    assert namespace["result"]["preview"]["media_type"] == "image/png"
    assert namespace["job"].status() == "COMPLETED"
    assert namespace["health"]["jobs"]["completed"] >= 2


@pytest.mark.slow
def test_self_hosted_examples(service_env, tmp_path, monkeypatch):
    require("curl")
    work = make_workdir(tmp_path)
    with serve_process(service_env, tmp_path / "serve.log") as (url, _):
        env = example_env(service_env, DA3_ENDPOINT=url, DA3_API_KEY=TEST_API_KEY)
        run_bash(SELF_HOSTED_CURL, work, env)
        check_decode_example(work, env, monkeypatch)
        body = json.loads((work / "response.json").read_text())
        assert body["preview"]["media_type"] == "image/png" and body["preview"]["base64"]

        check_client_example(work, env, monkeypatch)
        check_runpod_sdk_example(work, env, monkeypatch)

        run_bash(REQUEST_CLI, work, env)
    results = work / "results"
    with Image.open(results / "photo.depth.png") as depth:
        assert depth.size == PHOTO_SIZE[::-1] and depth.mode.startswith("I")
    assert np.load(results / "photo.depth.npy").shape == PHOTO_SIZE
    assert (results / "photo.preview.png").is_file()
    meta = json.loads((results / "photo.json").read_text())
    assert meta["width"] == PHOTO_SIZE[1] and meta["image_base64"].endswith("base64 chars>")


@pytest.mark.slow
def test_runpod_examples(service_env, tmp_path, monkeypatch):
    """RunPod's curl command and the client against RunPod's own local API server (the cloud
    is not reachable from tests; RunPod's key is not checked there)."""
    require("curl")
    work = make_workdir(tmp_path)
    with runpod_local_api(service_env, tmp_path / "worker.log") as url:
        env = example_env(
            service_env, DA3_ENDPOINT=url, DA3_API_KEY=TEST_API_KEY, RUNPOD_API_KEY="rp-local"
        )
        run_bash(RUNPOD_CURL, work, env)
        job = json.loads((work / "response.json").read_text())
        assert job["status"] == "COMPLETED"
        check_decode_example(work, env, monkeypatch)
        check_client_example(work, env, monkeypatch)

        # The README's word on failures: a FAILED job with our error object as JSON text.
        run_bash(RUNPOD_CURL, work, {**env, "DA3_API_KEY": "wrong-key"})
    failed = json.loads((work / "response.json").read_text())
    assert failed["status"] == "FAILED" and isinstance(failed["error"], str)
    error = json.loads(failed["error"])
    assert (error["code"], error["status"]) == ("unauthorized", 401) and error["message"]


@contextlib.contextmanager
def make_serve(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`make serve` on a free port, the venv taken as installed (`-o install`: this
    interpreter's venv, no pip run); yields the URL once /ready says the model is loaded."""
    port = free_port()
    venv = Path(sys.executable).parent.parent
    command = ["make", "-o", "install", "serve", f"PORT={port}", f"VENV={venv}"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # make and the server it started
        process.wait(60)


@pytest.mark.slow
def test_quick_start(service_env, tmp_path, monkeypatch):
    """`make serve` without DA3_API_KEY serves the playground at / and, unauthenticated on
    loopback, the quick start's curl (the plain form) and RunPod's {"input": ...} form at
    /runsync; the answer decodes as the README says."""
    require("curl", "make")
    work = make_workdir(tmp_path)
    env = example_env({k: v for k, v in service_env.items() if k != "DA3_API_KEY"})
    with make_serve(env, tmp_path / "make-serve.log") as url:
        page = httpx.get(f"{url}/", timeout=30)
        assert page.status_code == 200 and "<title>" in page.text and "app.js" in page.text
        run_bash(QUICK_START, work, env, url)
        photo = base64.b64encode((work / "photo.jpg").read_bytes()).decode()
        job = httpx.post(f"{url}/runsync", json={"input": {"image_base64": photo}}, timeout=300)
    assert job.status_code == 200 and job.json()["status"] == "COMPLETED"
    check_response(job.json()["output"])
    check_response(json.loads((work / "response.json").read_text()))
    check_decode_example(work, env, monkeypatch)


@pytest.fixture
def small_from_folder(small_snapshot):
    """The random DA3-SMALL loaded from its folder: what the examples' repo id must give."""
    from da3_serverless.inference.predictor import Predictor

    return Predictor.from_pretrained(small_snapshot, device="cpu")


def test_library_example(service_env, tmp_path, monkeypatch, small_from_folder):
    """The library example, its repo id resolved offline to the random DA3-SMALL in HF_HOME."""
    work = make_workdir(tmp_path)
    namespace = run_python(LIBRARY, work, example_env(service_env), monkeypatch)
    prediction, depth = namespace["prediction"], namespace["depth"]
    assert depth.shape == PHOTO_SIZE and depth.dtype == np.float32
    assert prediction.units == "relative" and not prediction.is_metric
    assert prediction.intrinsics.shape == (1, 3, 3) and prediction.extrinsics.shape == (1, 3, 4)
    expected = small_from_folder.predict(work / "photo.jpg")
    np.testing.assert_allclose(prediction.depth, expected.depth, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_predict_command_example(service_env, tmp_path, small_from_folder):
    """`da3-serverless predict` (model from MODEL_ID) writes what the library predicts."""
    work = make_workdir(tmp_path)
    run_bash(PREDICT_CLI, work, example_env(service_env))
    expected = small_from_folder.predict(work / "photo.jpg")
    with np.load(work / "photo.npz") as archive:
        assert str(archive["units"]) == "relative"
        np.testing.assert_allclose(archive["depth"], expected.depth, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(archive["intrinsics"], expected.intrinsics, rtol=1e-4)
        np.testing.assert_allclose(archive["confidence"], expected.confidence, rtol=1e-4)


# --- the tables -------------------------------------------------------------------------------


def section(title: str) -> str:
    """The README text under the heading `title` (any level), up to the next heading of the
    same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", README, flags=re.M)
    assert match, f"README has no section {title!r}"
    level = len(match.group(1))
    rest = README[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
    return rest[: end.start()] if end else rest


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown tables in `text` (no header rows), as stripped cells."""
    lines = text.splitlines()
    separator = re.compile(r"\|( *:?-+:? *\|)+")
    rows = []
    for index, line in enumerate(lines):
        is_header = index + 1 < len(lines) and separator.fullmatch(lines[index + 1])
        if line.startswith("|") and not separator.fullmatch(line) and not is_header:
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def settings_aliases() -> dict[str, object]:
    """Env var name -> the Settings default."""
    return {
        name: field.default
        for field in Settings.model_fields.values()
        for name in field.validation_alias.choices
    }


def test_configuration_table_matches_settings():
    rows = {}
    for cells in table_rows(section("Configuration")):
        for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]):
            rows[name] = cells[1]
    aliases = settings_aliases()
    assert not set(aliases) - set(rows), "Settings variables missing from the README table"
    bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
    for name in set(rows) - set(aliases):
        assert re.search(rf"\$\{{?{name}\b", bootstrap), f"{name}: neither Settings nor bootstrap"
    for name, default in aliases.items():
        cell = rows[name]
        if isinstance(default, bool):
            assert f"`{str(default).lower()}`" in cell, f"{name}: default {default}"
        elif isinstance(default, (int, float)):
            numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", cell.replace("_", ""))]
            assert float(default) in numbers, f"{name}: default {default}, README says {cell}"
        elif default is not None:
            assert str(default) in cell, f"{name}: default {default}, README says {cell}"


def test_model_table_matches_models():
    rows = {cells[0]: cells for cells in table_rows(section("Models"))}
    assert len(rows) == len(MODELS)
    for info in MODELS:
        _, preset, gives, license_, params, memory = rows[f"`{info.repo_id}`"]
        assert preset == f"`{info.preset}`"
        assert (license_, params, memory) == (
            info.license, f"{info.params_m} M", f"{info.gpu_memory_gb:.1f} GB",
        )  # fmt: skip
        assert ("metric" in gives) == info.can_give_meters, info.repo_id
        assert ("focal length" in gives) == info.needs_focal, info.repo_id
        for capability in ("camera", "confidence", "sky"):
            assert (capability in gives) == getattr(info, capability), (info.repo_id, capability)
        assert ("3D Gaussians" in gives) == info.gaussians, info.repo_id
        assert ("default" in gives) == (info.repo_id == DEFAULT_MODEL_ID)


def test_request_response_and_errors_documented():
    request_rows = {cells[0] for cells in table_rows(section("Request"))}
    assert request_rows == {f"`{name}`" for name in RunRequest.model_fields}
    for name in OUTPUT_NAMES:
        assert f"`{name}`" in section("Request")
    response = section("Response")
    for name in RunResponse.model_fields:
        assert f"`{name}`" in response, f"response field {name} is not documented"
    error_rows = {(cells[0], cells[1]) for cells in table_rows(section("Errors"))}
    # Each code with its status, and the server's 405 (a path's wrong method).
    expected = {(f"`{code}`", str(status)) for code, status in STATUS_BY_CODE.items()}
    assert error_rows == expected | {("`invalid_input`", "405")}


def test_commands_in_readme_exist():
    """Every `make` target the README names exists; every `da3-serverless` command line in it
    parses with the real argument parser."""
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.M))
    for target in set(re.findall(r"\bmake ([a-z][\w-]*)", README)):
        assert target in targets, f"make {target}"
    commands = re.findall(r"^(?:[A-Z_]+=\S+ )*da3-serverless (.+)$", README, flags=re.M)
    commands += re.findall(r"`da3-serverless ([^`]+)`", README)
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command.replace("[MODEL ...]", "MODEL"))
        if len(argv) == 1:  # a command named in prose: it exists, so its --help works
            with pytest.raises(SystemExit) as done:
                parser.parse_args([*argv, "--help"])
            assert done.value.code == 0, command
        else:
            parser.parse_args(argv)
    assert len(commands) >= 4


def test_every_module_is_in_the_architecture():
    """docs/ARCHITECTURE.md's layer table names every module (by its path in the package)."""
    architecture = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    assert "docs/ARCHITECTURE.md" in section("Development")
    package = REPO / "src" / "da3_serverless"
    for module in package.rglob("*.py"):
        if module.name != "__init__.py" or module.parent == package:
            name = module.relative_to(package).as_posix()
            assert f"`{name}`" in architecture, f"{name} is not in docs/ARCHITECTURE.md"


def test_every_benchmark_is_described():
    for script in sorted((REPO / "bench").glob("*.py")):
        if script.name != "common.py":
            assert f"`bench/{script.name}`" in README, f"bench/{script.name} is not in the README"
