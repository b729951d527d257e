"""Linters for the deployment files: shellcheck (scripts), hadolint (Dockerfile), actionlint
(workflows, with shellcheck on their `run:` blocks), plus the Dockerfile's own promises.

The linters come from requirements-test.txt as wheels that carry their binaries, so they run
offline. Each also lints a known-bad file, to prove it really runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
SHELL_SCRIPTS = [*sorted((REPO / "scripts").glob("*.sh")), REPO / ".ci" / "run"]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
# The tools sit beside the interpreter (the venv's bin/) or on PATH.
TOOL_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def lint(tool: str, *args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    executable = shutil.which(tool, path=TOOL_PATH)
    assert executable, f"{tool} not found: pip install -r requirements-test.txt"
    return subprocess.run(
        [executable, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": TOOL_PATH},
        check=False,
        timeout=120,
    )


def test_shell_scripts_pass_shellcheck() -> None:
    assert len(SHELL_SCRIPTS) >= 4
    result = lint("shellcheck", "--shell=bash", *SHELL_SCRIPTS)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in SHELL_SCRIPTS:
        assert "set -euo pipefail" in script.read_text(), script


def test_dockerfile_passes_hadolint() -> None:
    result = lint("hadolint", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_pass_actionlint() -> None:
    assert {p.name for p in WORKFLOWS} >= {"test.yml", "docker.yml"}
    result = lint("actionlint", *WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_linters_reject_known_bad_files(tmp_path: Path) -> None:
    bad_script = tmp_path / "bad.sh"
    bad_script.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    assert "SC2086" in lint("shellcheck", bad_script).stdout

    bad_dockerfile = tmp_path / "Dockerfile"
    bad_dockerfile.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    assert "DL3006" in lint("hadolint", bad_dockerfile).stdout  # untagged base image

    bad_workflow = tmp_path / "bad.yml"
    bad_workflow.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ github.event.head_commit.message }}\n"
        "      - uses: actions/checkout@v4\n        with:\n          no-such-input: 1\n"
    )
    result = lint("actionlint", "-no-color", bad_workflow)
    assert result.returncode == 1
    assert "no-such-input" in result.stdout


def test_every_module_src_imports_is_declared() -> None:
    """deptry (also in `make lint`): src/ imports no third-party module that pyproject.toml
    leaves undeclared, and declares nothing it does not use but what [tool.deptry] explains."""
    result = lint("deptry", "src")
    assert result.returncode == 0, result.stdout + result.stderr


def test_deptry_rejects_an_undeclared_import(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "bad"\nversion = "0"\ndependencies = ["numpy"]\n'
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "__init__.py").write_text("import numpy\nimport scipy\n")
    result = lint("deptry", "bad", cwd=tmp_path)
    assert result.returncode == 1
    assert "DEP003" in result.stdout + result.stderr  # scipy: only a transitive dependency


def test_one_supported_python_range() -> None:
    """README, requires-python, ruff's target-version and the CI matrix say one range: from
    the oldest Python CI tests (OpenEXR 3.5.3 needs 3.11), each tested version inside it."""
    with (REPO / "pyproject.toml").open("rb") as f:
        pyproject = tomllib.load(f)
    floor = pyproject["project"]["requires-python"].removeprefix(">=")
    assert re.fullmatch(r"3\.\d+", floor), "requires-python: one lower bound, >=3.N"
    assert pyproject["tool"]["ruff"]["target-version"] == "py" + floor.replace(".", "")
    test_jobs = yaml.safe_load((REPO / ".github" / "workflows" / "test.yml").read_text())["jobs"]
    matrix = test_jobs["test"]["strategy"]["matrix"]
    tested = {*matrix["python-version"], *(row["python-version"] for row in matrix["include"])}
    tested |= {
        step["with"]["python-version"]
        for job in test_jobs.values()
        for step in job["steps"]
        if step.get("uses", "").startswith("actions/setup-python")
        and "matrix" not in step["with"]["python-version"]
    }
    by_age = sorted(tested, key=lambda v: tuple(map(int, v.split("."))))
    assert by_age[0] == floor
    readme = (REPO / "README.md").read_text()
    assert f"Python {floor} or newer (CI tests {' and '.join(by_age)}," in readme
    assert not re.search(r"Python 3\.\d+ or newer", readme.replace(f"Python {floor} or newer", ""))


# --- what the Dockerfile promises ---------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_dockerfile_base_entrypoint_and_healthcheck() -> None:
    steps = instructions()
    assert [rest for kw, rest in steps if kw == "FROM"] == [
        "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
    ]
    last = {kw: rest for kw, rest in steps}
    assert last["CMD"] == '["/app/scripts/bootstrap.sh"]'
    assert last["ENTRYPOINT"] == '["/usr/bin/tini", "--"]'
    assert last["HEALTHCHECK"].endswith('CMD ["/app/scripts/healthcheck.sh"]')
    runs = " ".join(rest for kw, rest in steps if kw == "RUN")
    assert "-r /tmp/pylock.docker.toml" in runs  # dependencies only from the lock
    assert "--no-deps /src" in runs and "-e /src" not in runs  # the package, non-editable
    assert 'prefetch "$DA3_BAKED_MODEL_ID"' in runs


def test_no_secret_is_baked_into_a_layer() -> None:
    secretish = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY", re.IGNORECASE)
    for keyword, rest in instructions():
        if keyword in ("ARG", "ENV", "LABEL"):
            assert not secretish.search(rest), f"{keyword} {rest}: use a build secret"
    # The Hugging Face token may only arrive as a BuildKit secret mount.
    assert "--mount=type=secret,id=hf_token,env=HF_TOKEN" in DOCKERFILE.read_text()


def test_dockerignore_admits_exactly_what_the_build_reads() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list keeps .env files, .git and the venv out of the context"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]

    def admitted(path: str) -> bool:
        return any(path == a or path.startswith(a + "/") for a in allowed)

    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    read = re.findall(r"type=bind,source=([\w./-]+)", text)  # bind mounts from the context
    for keyword, rest in instructions():
        if keyword == "COPY" and "--from" not in rest:
            read += rest.split()[:-1]
    # The package is built from the whole (filtered) context: it needs these.
    read += ["pyproject.toml", "README.md", "src/da3_serverless/__init__.py"]
    assert "scripts/bootstrap.sh" in read
    for path in read:
        assert admitted(path), f"{path} is read by the build but excluded by .dockerignore"
        if path != "README.md":  # the lead's README may land later; the build needs it
            assert (REPO / path).exists(), path
    assert not admitted(".venv") and not admitted(".git") and not admitted("tests")


@pytest.mark.parametrize("script", ["bootstrap.sh", "prefetch.sh", "healthcheck.sh"])
def test_copied_scripts_exist(script: str) -> None:
    assert f"scripts/{script}" in DOCKERFILE.read_text()
    assert (REPO / "scripts" / script).is_file()


def test_the_server_user_exists_in_the_image() -> None:
    """bootstrap.sh drops the HTTP server to 10001:10001 by default: the image creates it."""
    runs = " ".join(rest for kw, rest in instructions() if kw == "RUN")
    assert "groupadd --system --gid 10001 da3" in runs
    assert "useradd --system --uid 10001 --gid da3" in runs
    assert '"${DA3_RUN_AS:-10001:10001}"' in (REPO / "scripts" / "bootstrap.sh").read_text()
