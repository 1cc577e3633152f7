"""The wheel installs one top-level import package, ``engine``: no ``tools`` or ``frontends`` that
would collide with other distributions in a user's environment; and it declares the pytest plugin
(a ``pytest11`` entry point), so that installing the engine makes the plugin available."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distribution
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_the_engine_package(tmp_path):
    src = tmp_path / "src"                   # a copy: building writes build/ and *.egg-info into the tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "models", "out", ".run", "build",
                                                             "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("lipsync_engine-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"engine"}, top
    # every module of every subpackage is inside it (engine-ctl imports them)
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "engine").rglob("*.py") if "__pycache__" not in p.parts}
    assert "engine/cli/main.py" in modules and "engine/front/front.py" in modules
    assert sorted(modules - set(names)) == []
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "engine-ctl = engine.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()
    assert "[pytest11]\nlipsync_engine = engine.testing.plugin" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_installed_distribution_declares_the_pytest_plugin_and_pytest_loads_it(request):
    (ep,) = distribution("lipsync-engine").entry_points.select(group="pytest11")
    assert (ep.name, ep.value) == ("lipsync_engine", "engine.testing.plugin")
    # pytest registers an entry point's plugin under the entry point's name: this session loaded it so
    plugin = request.config.pluginmanager.get_plugin("lipsync_engine")
    assert plugin is ep.load() and hasattr(plugin, "lse_engine")
    assert request.config.getoption("--lse-avatar") == "demo"
