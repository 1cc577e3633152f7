"""Real-time tests beside the others, the others yielding the CPU to them (conftest.py loads this).

A ``realtime`` test asserts rates and latencies, so it must not share the CPU with other tests on
equal terms. Where this process may make a cgroup in the kernel's ``cpu`` controller (cgroup v1,
root, as in CI), the xdist workers run in a child cgroup marked idle (``cpu.idle`` 1, else
``cpu.shares`` 2): the kernel runs its processes only on CPU time nothing else wants, and preempts
them at once when a process outside it wakes. A worker that runs a ``realtime`` test moves itself
(and what it started) back to the cgroup the run started in, so the test, its engines and peers
take the CPU they need while the other workers go on with the rest. Without such a cgroup (not
root, no ``cpu`` controller), ``realtime`` tests run alone instead, each with no other test running
(conftest's ``_turn``).

The browser tests (``realtime(alone=True)``) run alone even so: Chromium, the gateway's encoder
and the engine leave the idle cgroup no CPU for half a minute, and a test engine there whose GPU
worker could not run sent no heartbeat for 30 s and was killed. Weights instead of ``cpu.idle``
(``cpu.shares`` 1024 for the cgroup) left the others enough, but then four real-time tests missed
their rates. Nice values would not do: the kernel puts each session (an engine started with
``setsid``) in a group of its own (autogroup), and groups share the CPU equally, whatever their
processes' nice. Processes in a cgroup below the root have no autogroup.
"""
from __future__ import annotations

import os
from pathlib import Path

PREFIX = "lse-tests-"
LEAD = "-lead"                 # lse-tests-<pid>-lead: the Ray modules' cgroup, beside the idle one
LEAD_SHARES = 256


def _cpu_cgroup() -> tuple[Path, Path] | None:
    """(the ``cpu`` controller's cgroup v1 mount, this process's cgroup in it), or None."""
    mount = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup" and "cpu" in fields[sep + 3].split(","):
                mount = Path(fields[4])
    if mount is None:
        return None
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "cpu" in controllers.split(","):
                return mount, mount / path.lstrip("/")
    return None


def _move(pids, cgroup: Path) -> None:
    for pid in pids:
        try:
            (cgroup / "cgroup.procs").write_text(str(pid))
        except OSError:
            pass                                  # gone meanwhile


def _empty(cgroup: Path, into: Path) -> None:
    """Move what is left in ``cgroup`` and its child cgroups to ``into`` and remove them."""
    for child in cgroup.iterdir():
        if child.is_dir():
            _empty(child, into)
    for _ in range(3):
        _move((cgroup / "cgroup.procs").read_text().split(), into)
        try:
            cgroup.rmdir()
            return
        except OSError:
            pass                                  # a process forked while we moved the others


class CpuClasses:
    """The cgroups the xdist controller makes and removes at its end: the idle one, with ``rest`` in
    it, where the workers run; and beside it, not idle but of a low weight (``cpu.shares`` 256
    against 1024 for each busy process of the real-time tests), ``lead``, for the modules that keep
    a Ray cluster running (``no_realtime_beside``). In the idle cgroup a Ray cluster starved while
    real-time tests took both cores (a CI run: every agent silent for over 3 s, so the router
    answered ``no_host``); in ``lead`` the other tests yield to it. Beside real-time tests even that
    weight cost them frames (24.38 frames/s against a bound of 24.5) and once starved the agents
    again, so those modules now run after the real-time tests (tests/scheduling.py)."""

    def __init__(self, foreground: Path, background: Path):
        self.foreground = foreground
        self.background = background
        self.lead = background.with_name(background.name + LEAD)
        self.rest = background / "rest"

    @classmethod
    def make(cls) -> CpuClasses | None:
        found = _cpu_cgroup()
        if found is None:
            return None
        _, here = found
        for stale in here.glob(f"{PREFIX}*"):      # left by a run that was killed
            try:
                os.kill(int(stale.name[len(PREFIX):].removesuffix(LEAD)), 0)
            except ProcessLookupError:
                _empty(stale, here)
            except (ValueError, PermissionError):
                pass
        made = cls(here, here / f"{PREFIX}{os.getpid()}")
        try:
            made.background.mkdir()
        except OSError:
            return None                            # not root, or a read-only cgroup file system
        try:
            if (made.background / "cpu.idle").exists():
                (made.background / "cpu.idle").write_text("1")
            else:
                (made.background / "cpu.shares").write_text("2")
            made.rest.mkdir()
            made.lead.mkdir()
            (made.lead / "cpu.shares").write_text(str(LEAD_SHARES))
        except OSError:
            made.close()
            return None
        return made

    def close(self) -> None:
        for group in (self.background, self.lead):
            if group.exists():
                _empty(group, self.foreground)

    def names(self) -> dict[str, str]:
        """What the workers get (workerinput): a cgroup's path by class."""
        return {"realtime": str(self.foreground), "lead": str(self.lead), "rest": str(self.rest)}


def cpu_classes(config) -> dict[str, str] | None:
    """In an xdist worker, the cgroups :class:`CpuClasses` made (a path by class), if it could."""
    return getattr(config, "workerinput", {}).get("lse_cpu")


def join(cgroup: str, with_children: bool = False) -> None:
    """Move this process into ``cgroup`` (with everything it started, when asked)."""
    pids = [os.getpid()]
    if with_children:
        import psutil
        pids += [p.pid for p in psutil.Process().children(recursive=True)]
    _move(pids, Path(cgroup))
