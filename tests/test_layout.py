"""The package's shape: no import cycles between medvit modules, and a CLI that starts without torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import medvit

PACKAGE = Path(medvit.__file__).resolve().parent


def _module_name(package: Path, path: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the medvit modules it imports anywhere in its body (function-local imports count too)."""
    files = {_module_name(package, p): p for p in package.rglob("*.py") if "migrations" not in p.parts}
    root = package.name

    def owner(name: str) -> str | None:  # the module that `name` (a module or a name inside one) lives in
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        base = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base.split(".")[: len(base.split(".")) - node.level + 1]
                    pkg = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    pkg = node.module or ""
                names = [f"{pkg}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = owner(name) if name.split(".")[0] == root else None
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_sees_function_local_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("def g():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_no_import_cycles_inside_medvit():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100, "the graph must see the real package"
    assert cycles(graph) == []


def test_cli_starts_without_torch():
    # `medvit --help` must stay fast: commands import their heavy modules only when they run
    code = "import sys, medvit.cli; print(sorted({'torch', 'numpy', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_review_start_up_imports_no_fitting_libraries(tmp_path):
    # The app applies calibrators and the out-of-distribution check and never fits them: scikit-learn and SciPy's
    # stats and optimisers are imported by the fits only (about 2.5 s of the server's start-up; docs/app.md).
    # What the server does before its first table: import the page module, load the model, score the example.
    code = (
        "import sys; from pydicom.data import get_testdata_file; from medvit.review import app; "
        "service = app.get_service(None); path = get_testdata_file('RG1_UNCI.dcm'); "
        "assert service.analyze(open(path, 'rb').read(), 'RG1_UNCI.dcm').prediction is not None; "
        "print(sorted({'sklearn', 'scipy.stats', 'scipy.optimize'} & set(sys.modules)))"
    )
    env = {**os.environ, "MEDVIT_DB_URL": f"sqlite:///{tmp_path / 'reviews.sqlite3'}", "MEDVIT_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", ["predict", "bench", "export", "train", "watch"])
def test_command_arguments_are_checked_before_torch_is_imported(command):
    # a user error (a bad flag, --help) must answer in a second, not after the 5 s torch import
    code = ("import sys; from medvit.cli import build_parser; build_parser(sys.argv[1]); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
