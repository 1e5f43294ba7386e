"""The three layers hold: ``cli → pipeline → core``, imports one way, no cycles, a torch-free ``--help``.

The import graph is built by ``grimp`` from the source: every ``import`` statement counts, at module level,
inside a function, or under ``if TYPE_CHECKING:`` (a type-only cycle still ties two modules together: one
cannot be read, moved or tested without the other). Core is every ``geoloc`` module outside
``geoloc.pipeline`` and ``geoloc.cli``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parents[1]


def _layer(module: str) -> str:
    if module == "geoloc.cli" or module.startswith("geoloc.cli."):
        return "cli"
    if module == "geoloc.pipeline" or module.startswith("geoloc.pipeline."):
        return "pipeline"
    return "core"


@pytest.fixture(scope="module")
def edges() -> set[tuple[str, str]]:
    sys.path.insert(0, str(ROOT))  # the checkout under test, not an installed copy
    try:
        graph = grimp.build_graph("geoloc", exclude_type_checking_imports=False, cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))
    out = {(m, d) for m in graph.modules for d in graph.find_modules_directly_imported_by(m)}
    assert len(graph.modules) > 30 and len(out) > 50, "the graph looks empty: is geoloc importable?"
    return out


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-imports."""
    succ: dict[str, list[str]] = {}
    for a, b in edges:
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or (v, v) in edges:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(succ):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_cycles() -> None:
    assert _cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert _cycles({("a", "b"), ("b", "c")}) == []


def test_core_never_imports_pipeline_or_cli(edges: set[tuple[str, str]]) -> None:
    bad = sorted(e for e in edges if _layer(e[0]) == "core" and _layer(e[1]) != "core")
    assert not bad, f"core modules import the pipeline or the CLI: {bad}"


def test_pipeline_never_imports_cli(edges: set[tuple[str, str]]) -> None:
    bad = sorted(e for e in edges if _layer(e[0]) == "pipeline" and _layer(e[1]) == "cli")
    assert not bad, f"pipeline modules import the CLI: {bad}"


def test_no_import_cycles(edges: set[tuple[str, str]]) -> None:
    cycles = _cycles(edges)
    assert not cycles, f"import cycles between geoloc modules: {cycles}"


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from geoloc.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'duckdb', 'pyarrow', 'ray', 'matplotlib')"
        " if m in sys.modules]\n"
        "print(json.dumps({'code': r.exit_code, 'heavy': heavy, 'out': r.output}))\n"
    )
    env_path = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "COLUMNS": "120"},
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["code"] == 0 and "predict" in res["out"] and "train" in res["out"]
    assert res["heavy"] == [], f"`geoloc --help` imports {res['heavy']}"
