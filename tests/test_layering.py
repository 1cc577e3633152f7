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


def imports_of(module: str) -> set[str]:
    """The engine modules ``module`` imports, anywhere in its body (function-level imports too;
    imports only for type annotations excepted)."""
    found: set[str] = set()
    for node in _nodes(ast.parse(MODULES[module].read_text())):
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
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text())) or ""
    m = re.search(r"^May import: (.*?)\.?$", doc, re.M)
    assert m, f"{MODULES[package]}: its docstring must say what the package may import ('May import: ...')"
    return {x.strip() for x in m.group(1).split(",") if x.strip().startswith("engine")}


def test_every_package_says_its_role_and_what_it_may_import():
    assert PACKAGES, "no packages found under engine/"
    for pkg in PACKAGES:
        doc = ast.get_docstring(ast.parse(MODULES[pkg].read_text())) or ""
        role = doc.split("May import:")[0].strip()
        assert len(role) > 40, f"{MODULES[pkg]}: say in a few lines what the role of {pkg} is"
        for dep in declared(pkg):
            assert dep in PACKAGES or dep in FACE, f"{pkg} declares an unknown dependency {dep}"


def test_packages_import_only_what_they_declare():
    wrong = []
    for module in MODULES:
        u = unit(module)
        if u not in PACKAGES:
            continue
        allowed = declared(u) | {u, "engine"}
        for dep in imports_of(module):
            if unit(dep) not in allowed:
                wrong.append(f"{module} imports {dep} ({u} may import: {', '.join(sorted(declared(u))) or 'nothing'})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_face_stays_light():
    """protocol imports nothing of the engine; ``engine`` itself nothing at import time (``from engine
    import Client`` is resolved lazily). The client package declares its own (protocol, runtime)."""
    assert imports_of("engine.protocol") == set()
    top = ast.parse(MODULES["engine"].read_text())
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
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_sees_a_wrong_import(tmp_path, monkeypatch):
    """The checks can fail: a worker module that imports the front is reported."""
    fake = ROOT / "worker" / "gpu_worker.py"
    src = fake.read_text() + "\nfrom engine.front.scheduler import Scheduler  # noqa\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: src if self == fake else
                        Path.read_bytes(self).decode())
    with pytest.raises(AssertionError, match="engine.worker.gpu_worker imports engine.front.scheduler"):
        test_packages_import_only_what_they_declare()
