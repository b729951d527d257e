"""The shape of the code, checked: the public face, where tests read data from, function
length, module docstrings, one import style and one way to name loggers, imports that point
only down the layers."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import da3_serverless
from paths import DATA, IMAGES, REPO

SRC = REPO / "src" / "da3_serverless"
MODULES = sorted(p for p in SRC.rglob("*.py"))
TEST_FILES = sorted((REPO / "tests").glob("*.py"))
MAX_FUNCTION_LINES = 60
# A longer function carries its reason in a comment on the line above its `def`.
LONG_REASON = re.compile(r"#\s*long function:\s*\S")


def test_public_names_resolve():
    for name in da3_serverless.__all__:
        assert getattr(da3_serverless, name) is not None
    assert da3_serverless.Predictor.__name__ == "Predictor"
    assert issubclass(da3_serverless.DA3Error, Exception)


def test_importing_the_package_and_the_client_leaves_torch_out():
    code = (
        "import sys\n"
        "import da3_serverless\n"
        "from da3_serverless import Client, DA3Error, DepthResult\n"
        "import da3_serverless.cli\n"
        "heavy = sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_test_data_lives_in_the_repository():
    for folder in (DATA, IMAGES):
        assert folder.resolve().is_relative_to(REPO) and folder.is_dir()
    outside = re.compile(r"\.\./shared|parents\[\d+\]\.parent|REPO\.parent|shared/data")
    offenders = [
        f"{path.name}:{number}"
        for path in TEST_FILES
        if path.name != Path(__file__).name
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert not offenders, f"test paths that leave the repository: {offenders}"


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_functions_are_short_or_say_why(path: Path):
    lines = path.read_text().splitlines()
    long = []
    for node in _functions(path):
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        length = node.end_lineno - node.lineno + 1
        reason = LONG_REASON.search(lines[first - 2]) if first >= 2 else None
        if length > MAX_FUNCTION_LINES and not reason:
            long.append(f"{node.name} ({length} lines)")
    assert not long, f"over {MAX_FUNCTION_LINES} lines without a '# long function:' reason"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_modules_have_a_docstring_absolute_imports_and_named_loggers(path: Path):
    text = path.read_text()
    tree = ast.parse(text)
    assert ast.get_docstring(tree), "every module says what it is for"
    relative = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, f"relative imports on lines {relative}: import from da3_serverless"
    loggers = re.findall(r"getLogger\(([^)]*)\)", text)
    assert all(arg == "__name__" for arg in loggers), loggers


# The layers of docs/ARCHITECTURE.md §1, lowest first: a module imports only its own layer or
# those below (`config`, the one reader of the environment, sits under all). The package's
# `__init__` is the public face over all of them.
LAYERS = {
    "config": 0, "model": 1, "inference": 2, "exports": 3, "api": 4, "sequence": 5,
    "service": 6, "startup": 7, "server": 7, "runpod_worker": 7, "client": 7, "batch": 7,
    "cli": 9,
}  # fmt: skip


def _layer(parts: list[str]) -> int:
    return LAYERS[parts[0].removesuffix(".py")]


def _modules_named(node: ast.AST) -> list[str]:
    """The modules an import statement names (`import a.b` and `from a.b import c` alike)."""
    if isinstance(node, ast.ImportFrom):
        return [node.module] if node.module and not node.level else []
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return []


def test_imports_point_only_downward():
    upward = []
    for path in MODULES:
        parts = list(path.relative_to(SRC).parts)
        if parts == ["__init__.py"]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            for module in _modules_named(node):
                target = module.split(".")[1:]
                if module.startswith("da3_serverless.") and _layer(target) > _layer(parts):
                    upward.append(f"{'/'.join(parts)}:{node.lineno} imports {module}")
    assert not upward, upward


def test_server_routes_share_their_state_without_importing_the_app():
    routes = [p for p in (SRC / "server").glob("*.py") if p.name not in ("app.py", "__init__.py")]
    importers = [p.name for p in routes if "da3_serverless.server.app" in p.read_text()]
    assert not importers, importers


def test_fixtures_that_start_the_service_elsewhere_are_known_to_conftest():
    """`make test-fast` leaves out the tests that start the service in another process; it
    knows them by their fixtures (conftest.PROCESS_FIXTURES), so a new one must be listed."""
    from conftest import PROCESS_FIXTURES

    starts = re.compile(r"\b(serve_process|runpod_local_api|runpod_local_process)\(")
    unlisted = []
    for path in TEST_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            is_fixture = any("fixture" in ast.unparse(d) for d in node.decorator_list)
            if (
                is_fixture
                and starts.search(ast.unparse(node))
                and node.name not in PROCESS_FIXTURES
            ):
                unlisted.append(f"{path.name}: {node.name}")
    assert not unlisted, f"add to conftest.PROCESS_FIXTURES: {unlisted}"


# `make test-fast` leaves out these marks; every module must still be run by the tests it keeps.
LEFT_OUT_MARKS = re.compile(r"\bmark\.(slow|server|large)\b")


def _kept_by_test_fast(node: ast.AST, process_fixtures: set[str]) -> bool:
    """Whether `make test-fast` keeps a test function: no left-out mark, no fixture that
    starts the service in another process (conftest marks those `server`)."""
    marked = any(LEFT_OUT_MARKS.search(ast.unparse(d)) for d in node.decorator_list)
    return not marked and not process_fixtures & {a.arg for a in node.args.args}


def _imported(tree: ast.Module, process_fixtures: set[str]) -> set[str]:
    """The modules a file imports at module level, in its helpers and fixtures and in the tests
    that `make test-fast` keeps (not in the tests it leaves out). `from a import b` counts
    both `a` and `a.b` (b may be a module)."""
    names, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        is_test = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
            "test_"
        )
        if is_test and not _kept_by_test_fast(node, process_fixtures):
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        todo.extend(ast.iter_child_nodes(node))
    return names


def _with_packages(names: set[str]) -> set[str]:
    """Importing `a.b.c` also runs `a` and `a.b`."""
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def test_every_module_is_imported_by_the_fast_tier():
    """Each module under src/ is imported, directly or through other modules and test helpers,
    by a test file that `make test-fast` runs: a file without a module-level slow, server or
    large mark, through its tests that the fast tier keeps."""
    from conftest import PROCESS_FIXTURES

    def module_name(path: Path) -> str:
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    graph = {module_name(p): _imported(ast.parse(p.read_text()), PROCESS_FIXTURES) for p in MODULES}
    roots = set()
    for path in TEST_FILES:
        tree = ast.parse(path.read_text())
        marks = [
            n for n in tree.body if isinstance(n, ast.Assign) and "pytestmark" in ast.unparse(n)
        ]
        if path.name.startswith("test_") and any(
            LEFT_OUT_MARKS.search(ast.unparse(m)) for m in marks
        ):
            continue
        imported = _imported(tree, PROCESS_FIXTURES)
        if path.name.startswith("test_") or path.name == "conftest.py":
            roots |= imported
        else:  # a helper module (servers.py, reference.py): reached when a kept file imports it
            graph[path.stem] = imported
    reached, todo = set(), list(roots)
    while todo:
        for name in _with_packages({todo.pop()}) - reached:
            reached.add(name)
            todo.extend(graph.get(name, ()))
    missing = sorted(set(map(module_name, MODULES)) - reached)
    assert not missing, f"modules no test in `make test-fast` imports: {missing}"
