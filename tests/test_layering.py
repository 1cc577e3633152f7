"""The layout stays layered: each package of engine/ imports only what its ``__init__`` says it may
("May import: ..."), the packages' declared graph has no cycle, no module imports another in a
circle (function-level imports count), and no module grows far past a sitting's read."""
from __future__ import annotations

import ast
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "engine"
MAX_LINES = 520                 # "no module over ~500 lines" (issue 13)
FACE = {"engine", "engine.protocol"}      # the package's face: top-level modules (and the client package)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
SOURCES = {m: p.read_text() for m, p in MODULES.items()}
PACKAGES = sorted(m for m, p in MODULES.items() if p.name == "__init__.py" and m != "engine")


def unit(module: str) -> str:
    """The layering unit of a module: its package under engine/, or the top-level module itself."""
    parts = module.split(".")
    return module if len(parts) == 1 else ".".join(parts[:2])


def _nodes(tree: ast.AST):
    """Every node, but not the bodies of ``if TYPE_CHECKING:`` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from _nodes(node)


def imports_of(module: str, sources: dict[str, str] = SOURCES) -> set[str]:
    """The engine modules ``module`` imports, anywhere in its body (function-level imports too;
    imports only for type annotations excepted)."""
    found: set[str] = set()
    for node in _nodes(ast.parse(sources[module])):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "engine")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                  # relative: resolve against the package
                pkg = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            if base.split(".")[0] != "engine":
                continue
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            found.update(subs or [base])
    found.discard(module)
    return found


def declared(package: str) -> set[str]:
    doc = ast.get_docstring(ast.parse(SOURCES[package])) or ""
    m = re.search(r"^May import: (.*?)\.?$", doc, re.M)
    assert m, f"{MODULES[package]}: its docstring must say what the package may import ('May import: ...')"
    return {x.strip() for x in m.group(1).split(",") if x.strip().startswith("engine")}


def test_every_package_says_its_role_and_what_it_may_import():
    assert PACKAGES, "no packages found under engine/"
    for pkg in PACKAGES:
        doc = ast.get_docstring(ast.parse(SOURCES[pkg])) or ""
        role = doc.split("May import:")[0].strip()
        assert len(role) > 40, f"{MODULES[pkg]}: say in a few lines what the role of {pkg} is"
        for dep in declared(pkg):
            assert dep in PACKAGES or dep in FACE, f"{pkg} declares an unknown dependency {dep}"


def wrong_imports(sources: dict[str, str]) -> list[str]:
    """Every import against the layering: a package module importing what its package does not declare."""
    allowed = {pkg: declared(pkg) | {pkg, "engine"} for pkg in PACKAGES}
    return [f"{module} imports {dep} ({unit(module)} may import: "
            f"{', '.join(sorted(declared(unit(module)))) or 'nothing'})"
            for module in MODULES if unit(module) in allowed
            for dep in sorted(imports_of(module, sources)) if unit(dep) not in allowed[unit(module)]]


def test_packages_import_only_what_they_declare():
    wrong = wrong_imports(SOURCES)
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_face_stays_light():
    """protocol imports nothing of the engine; ``engine`` itself nothing at import time (``from engine
    import Client`` is resolved lazily). The client package declares its own (protocol, runtime)."""
    assert imports_of("engine.protocol") == set()
    top = ast.parse(SOURCES["engine"])
    eager = [n for n in top.body if isinstance(n, (ast.Import, ast.ImportFrom))
             and (n.module or "").split(".")[0] == "engine"]
    assert not eager, "engine/__init__.py must not import engine modules eagerly"


def test_the_declared_package_graph_has_no_cycle():
    graph = {pkg: declared(pkg) & set(PACKAGES) for pkg in PACKAGES}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"the packages' declared imports form a cycle: {e.args[1]}")
    assert set(order) == set(PACKAGES)


def test_no_module_imports_in_a_circle():
    graph = {m: {d for d in imports_of(m) if d in MODULES and MODULES[d].name != "__init__.py"}
             for m in MODULES if MODULES[m].name != "__init__.py"}
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"modules import each other in a circle: {' -> '.join(e.args[1])}")


def test_no_module_is_too_long_to_read_in_one_sitting():
    long = {m: n for m, src in SOURCES.items() if (n := len(src.splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_sees_a_wrong_import():
    """The checks can fail: a worker module that imports the front is reported."""
    planted = {**SOURCES, "engine.worker.gpu_worker": SOURCES["engine.worker.gpu_worker"]
               + "\nfrom engine.front.scheduler import Scheduler  # noqa\n"}
    assert any(w.startswith("engine.worker.gpu_worker imports engine.front.scheduler") for w in wrong_imports(planted))
