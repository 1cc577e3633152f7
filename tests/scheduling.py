"""How ``./tools/dev test`` spreads the suite over pytest-xdist's workers (conftest.py imports these
hooks). Most tests wait (engines at 25 frames/s, timeouts, Ray), so the suite runs more workers than
cores; what limits it is the tests that must not share the machine:

- ``realtime`` tests, all in one unit, so one worker runs them one after the other (each one's
  own function-scoped fixtures start after the one before has ended; the WebRTC module's gateway,
  echo bot and Chromium start once, before its first test). Where the other tests
  yield the CPU to them (an idle cgroup, tests/priority.py), that unit goes first and runs beside
  everything else, and the ``realtime(alone=True)`` ones form a unit of their own, last, each alone
  (conftest's ``_realtime_runs_alone``). Where not, every one runs alone: the unit goes last,
  handed out after every other unit, so workers wait for them only while finishing their last
  units;
- the modules whose fixtures keep a Ray cluster running (they use ``no_realtime_beside``) must not
  overlap one another, nor a real-time test: with the idle cgroup they join the ``realtime`` unit,
  after its real-time tests, so the worker that ran those runs them back to back next (a Ray
  cluster beside real-time tests, even at a low weight, cost them frames and starved its agents);
  without it they go first, as a unit of their own, while the others take the rest;
- everything else: xdist's ``loadscope`` units (a module on one worker, so its module fixtures are
  made once), the longest first (WEIGHTS), so no long module is left to start at the end.

The workers know the marks and fixtures, the controller (which schedules) sees only test ids: each
worker writes the groups it found to a file the controller reads when collection is done.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from tests.priority import CpuClasses, cpu_classes, join

BACKGROUND = "~background"              # the unit of the Ray cluster modules
REALTIME = "~realtime"                  # the unit of the real-time tests
ALONE = "~alone"                        # with an idle cgroup: the real-time tests that run alone even so

# seconds a module took on the 2-core VM in a suite run (2026-12-06, the sixth session; without its
# real-time tests): only the order depends on them, so a stale figure costs time, never a result.
# Modules not named: 0.5 s a test.
WEIGHTS = {
    "tests/avatars/test_real_footage.py": 85, "tests/front/test_streams.py": 57,
    "tests/testing/test_plugin.py": 52, "tests/test_gpu_bench.py": 43, "tests/front/test_bounds.py": 41,
    "tests/integration/test_integration.py": 31, "tests/worker/test_gpu_worker.py": 30,
    "tests/avatars/test_avatar_import.py": 30, "tests/bench/test_bench_import.py": 28, "tests/cli/test_cli.py": 28,
    "tests/supervisor/test_supervisor.py": 25, "tests/frontends/test_pipecat.py": 22,
    "tests/integration/test_shared_sessions.py": 21, "tests/integration/test_chaos.py": 21,
    "tests/frontends/test_browser.py": 20, "tests/front/test_security.py": 20,
    "tests/supervisor/test_prometheus.py": 18,
    "tests/frontends/test_gateway.py": 15, "tests/worker/test_precision.py": 13, "tests/kernels/test_splice.py": 11,
    "tests/worker/test_shared.py": 10, "tests/test_packaging.py": 10, "tests/runtime/test_metrics.py": 9,
    "tests/frontends/test_webrtc.py": 9, "tests/cluster/test_placement_sim.py": 9, "tests/cluster/test_agent.py": 9,
    "tests/frontends/test_node_client.py": 9, "tests/cli/test_avatar_check.py": 9,
}


def group_of(item: pytest.Item) -> str | None:
    if "no_realtime_beside" in item.fixturenames:
        return BACKGROUND
    mark = item.get_closest_marker("realtime")
    if mark is None:
        return None
    beside = cpu_classes(item.config) is not None                        # an idle cgroup (priority.py)
    return ALONE if beside and mark.kwargs.get("alone", False) else REALTIME


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        if cpu_classes(config):
            join(cpu_classes(config)["rest"])               # the idle cgroup (tests/priority.py)
    elif getattr(config.option, "numprocesses", None):
        config._lse_groups = Path(tempfile.mkdtemp(prefix="lse-groups-")) / "groups.json"
        config.option.loadscopereorder = False          # the units in the order the workers collected
        config._lse_cpu = CpuClasses.make()


def pytest_unconfigure(config: pytest.Config) -> None:
    path = getattr(config, "_lse_groups", None)
    if path is not None:
        path.unlink(missing_ok=True)
        path.parent.rmdir()
    if getattr(config, "_lse_cpu", None) is not None:
        config._lse_cpu.close()


@pytest.hookimpl(optionalhook=True)             # xdist's hooks: known only with xdist loaded
def pytest_configure_node(node) -> None:
    path = getattr(node.config, "_lse_groups", None)
    if path is not None:
        node.workerinput["lse_groups"] = str(path)
    classes = getattr(node.config, "_lse_cpu", None)
    if classes is not None:
        node.workerinput["lse_cpu"] = classes.names()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput") or "lse_groups" not in config.workerinput:
        return
    groups = {item.nodeid: group_of(item) for item in items}
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)

    def weight(module: str) -> float:
        return WEIGHTS.get(module, 0.5 * len(modules[module]))
    plain = sorted(modules, key=lambda m: -weight(m))

    def of(group: str) -> list[pytest.Item]:
        return [i for i in items if groups[i.nodeid] == group]
    beside = cpu_classes(config) is not None                      # an idle cgroup (priority.py)
    items[:] = ((of(REALTIME) if beside else []) + of(BACKGROUND)
                + [i for m in plain for i in modules[m] if groups[i.nodeid] is None]
                + ([] if beside else of(REALTIME)) + of(ALONE))
    # with the idle cgroup, the Ray modules follow the real-time tests in their unit: one worker runs
    # them after the last real-time test, so no real-time test shares the CPU with a Ray cluster
    units = {k: (REALTIME if beside and v == BACKGROUND else v) for k, v in groups.items() if v}
    path = Path(config.workerinput["lse_groups"])
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(units))
    os.replace(tmp, path)                                # every worker writes the same


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadscope" or getattr(config, "_lse_groups", None) is None:
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                path = config._lse_groups
                self.groups = json.loads(path.read_text()) if path.exists() else {}
            return self.groups.get(nodeid) or super()._split_scope(nodeid)

    return GroupScheduling(config, log)
