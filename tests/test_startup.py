"""Before a transport starts: where the workspace is and why, the checks of the workspace and
the default model (messages that say what to do, in three lines), and the ready line.

The container and RunPod choices (the volume, else /workspace) are bootstrap.sh's, tested in
test_bootstrap.py; here the plain machine's, with every folder under the test's tmp_path."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from conftest import SMALL_REPO, offline_settings
from da3_serverless.config import Settings
from da3_serverless.service import Service
from da3_serverless.startup import StartupError, check_start, check_workspace, workspace_line
from servers import serve_command

USER_VARIABLES = ("WORKSPACE", "HF_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME")


@pytest.fixture
def plain_machine(tmp_path, monkeypatch):
    """No WORKSPACE, HF_HOME or XDG folders set; HOME is a temporary folder."""
    for name in USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.skipif(sys.platform != "linux", reason="the XDG folders are Linux's")
def test_without_workspace_the_user_folders_are_used_and_said_why(plain_machine, monkeypatch):
    volume = plain_machine / "runpod-volume"  # a writable volume is no reason to guess
    volume.mkdir(parents=True)
    monkeypatch.setenv("RUNPOD_VOLUME", str(volume))
    settings = Settings()
    assert settings.workspace_dir == plain_machine / ".local" / "share" / "da3-serverless"
    assert settings.cache_dir == plain_machine / ".cache" / "da3-serverless"
    assert "WORKSPACE is unset" in settings.workspace_reason
    check_workspace(settings)  # a non-root user can write there: it is under HOME
    assert settings.output_dir.is_dir() and not (volume / "DA3-Serverless").exists()
    line = workspace_line(settings)
    assert str(settings.workspace_dir) in line and str(settings.cache_dir) in line

    monkeypatch.setenv("XDG_DATA_HOME", str(plain_machine / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(plain_machine / "cache"))
    assert Settings().workspace_dir == plain_machine / "data" / "da3-serverless"
    assert Settings().cache_dir == plain_machine / "cache" / "da3-serverless"


def test_workspace_set_holds_the_cache_too(plain_machine):
    settings = Settings(workspace=plain_machine / "ws")
    assert (settings.workspace_dir, settings.workspace_reason) == (
        plain_machine / "ws", "WORKSPACE is set")  # fmt: skip
    assert settings.cache_dir == plain_machine / "ws" / "cache"


def test_an_unwritable_workspace_says_what_to_do(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # even root cannot make folders under a file
    settings = offline_settings(None, blocker / "workspace")
    with pytest.raises(StartupError) as error:
        check_workspace(settings)
    what, why, steps = str(error.value).split("\n")
    assert what.startswith("cannot write to ") and str(blocker) in what
    assert "WORKSPACE is set" in why
    assert steps.startswith("next: set WORKSPACE") and len(steps) < 200


@pytest.mark.parametrize("problem", ["workspace", "model"])
def test_serve_stops_at_start_with_three_lines_and_no_traceback(service_env, tmp_path, problem):
    """`da3-serverless serve` as a process: an unwritable workspace or a missing model (offline)
    stops it before it listens, with `error:` and the three lines."""
    env = dict(service_env)
    if problem == "workspace":
        (tmp_path / "a-file").write_text("")
        env["WORKSPACE"] = str(tmp_path / "a-file" / "workspace")
    else:
        env["MODEL_ID"] = "depth-anything/DA3-BASE"
    done = subprocess.run(serve_command("serve", "--port", "9"), env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("workspace ") and "WORKSPACE is set" in lines[0]
    assert lines[1].startswith("error: ") and len(lines) == 4, done.stderr
    assert lines[3].startswith("next: ")
    if problem == "model":
        assert "'depth-anything/DA3-BASE' not found" in lines[1] and "HF_HUB_OFFLINE=1" in lines[2]


def test_check_start_finds_the_model_and_the_service_says_when_it_is_ready(
    hf_cache, tmp_path, caplog
):
    settings = offline_settings(hf_cache, tmp_path / "workspace", warmup=False)
    [folder] = check_start(settings)  # one snapshot folder (a pair of models has two)
    assert (folder / "model.safetensors").is_file()
    with caplog.at_level(logging.INFO, logger="da3_serverless.service"):
        Service(settings).start()
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready:")]
    assert len(ready) == 1
    assert ready[0].startswith(f"ready: model {SMALL_REPO} on cpu (float32), loaded in ")
    assert ready[0].endswith(" s")
