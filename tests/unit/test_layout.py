"""The repository's shape: no import loops, modules of a readable size, every subpackage
packaged without a hand-kept list, and docs that stand alone."""

from __future__ import annotations

import ast
import runpy
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = runpy.run_path(str(REPO / "setup.py"))
ROOTS: tuple[str, ...] = SETUP["ROOTS"]
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out["duplexd." + ".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _module_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """duplexd modules imported when ``path`` is imported (not inside functions, not
    under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and not _type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in modules}


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    modules = _modules()
    graph = {m: _module_level_imports(p, modules) - {m} for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return cycles


def test_no_import_loops() -> None:
    assert import_cycles() == []


def test_the_loop_check_sees_a_planted_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bus").mkdir()
    (tmp_path / "bus" / "a.py").write_text("from duplexd.bus.b import x\n")
    (tmp_path / "bus" / "b.py").write_text("from duplexd.bus import a\nx = 1\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    monkeypatch.setattr(f"{__name__}.ROOTS", ("bus",))
    assert import_cycles() == [["duplexd.bus.a", "duplexd.bus.b"]]


def test_bus_depends_on_nothing_of_ours_above_it() -> None:
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("duplexd.bus"):
            above = {m for m in _module_level_imports(path, modules) if not m.startswith("duplexd.bus")}
            assert not above, (name, above)


def test_modules_stay_readable() -> None:
    long = {}
    for root in ("actors", "adapters"):
        for path in (REPO / root).rglob("*.py"):
            rel = str(path.relative_to(REPO))
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                long[rel] = n
    assert long == {}


def test_every_subpackage_is_packaged_without_a_list() -> None:
    packages = set(SETUP["packages"]())
    on_disk = {
        "duplexd." + ".".join(p.parent.relative_to(REPO).parts)
        for root in ROOTS
        for p in (REPO / root).rglob("__init__.py")
    }
    assert on_disk <= packages and "duplexd.actors.engines.cascade" in packages


def test_docs_and_code_stand_alone() -> None:
    """Nothing cites the founders' design notes, which are not part of the repository."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    needles = ("DESIGN" + ".md", "PROTOCOLS" + ".md", "../" + "shared")
    hits = []
    for name in files.splitlines():
        path = REPO / name
        if path.suffix in (".py", ".md", ".toml", ".txt", ".js", ".html", ".sh", "") and path.is_file():
            text = path.read_text(errors="replace")
            hits += [f"{name}: {n}" for n in needles if n in text]
    assert hits == []
