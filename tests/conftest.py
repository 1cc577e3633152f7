"""Shared fixtures: a small demo avatar, and real engines started as separate processes."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.cli.demo_avatars import make_audio_encoder, make_demo
from engine.runtime.config import EngineConfig, load_config
from engine.runtime.shm import list_segments
from engine.supervisor.control import control
from engine.runtime.derived import dump_toml, free_port  # noqa: F401 - free_port: the tests import it from here
from tests.priority import cpu_classes, join

pytest_plugins = ["tests.scheduling"]          # the order and the units the xdist workers get


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_demo(root, frames=12)
    make_audio_encoder(root)
    return root


@dataclass
class RunningEngine:
    cfg: EngineConfig
    proc: subprocess.Popen
    log: Path

    @property
    def endpoint(self) -> str:
        return self.cfg.server.front

    @property
    def prefix(self) -> str:
        return f"{self.cfg.server.instance}_"

    def status(self, timeout: float = 5.0) -> dict:
        st = control(self.cfg, "status", timeout)
        assert st is not None, "engine does not answer on its control socket\n" + self.log.read_text()[-3000:]
        return st

    def pid_of(self, role: str, idx: int = 0) -> int:
        return next(p["pid"] for p in self.status()["processes"] if p["role"] == role and p["idx"] == idx)

    def wait_ready(self, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("engine exited:\n" + self.log.read_text()[-3000:])
            st = control(self.cfg, "status", 1.0)
            if st and st["ready"] and all(p["state"] == "ready" for p in st["processes"]):
                return st
            time.sleep(0.2)
        raise AssertionError("engine not ready in time:\n" + self.log.read_text()[-3000:])

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            control(self.cfg, "stop", 2.0)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError("engine did not stop in time:\n" + self.log.read_text()[-3000:])
        return self.proc.returncode


def write_config(path: Path, models_root: Path, run_dir: Path, instance: str, extra: str = "",
                 server: str = "", gpu: str = "") -> Path:
    """A test engine's config: CPU provider, two compositors, small rings. ``extra`` is TOML whose
    keys override or add to these (sections may repeat the base ones); ``server`` and ``gpu``: more
    lines of the [server] and [gpu] sections."""
    import tomllib
    base: dict = {"server": {"front": f"tcp://127.0.0.1:{free_port()}", "run_dir": str(run_dir),
                             "instance": instance},
                  "gpu": {"devices": [], "intra_op_threads": 1}, "compositor": {"processes": 2},
                  "ring": {"slots": 3},
                  "supervision": {"max_restarts": 3, "heartbeat_timeout_s": 30, "request_timeout_s": 30}}
    more = tomllib.loads(f"[server]\n{server}\n[gpu]\n{gpu}\n{extra}")
    for section, table in more.items():
        if isinstance(table, dict) and isinstance(base.get(section), dict):
            base[section].update(table)
        else:
            base[section] = table
    path.write_text(dump_toml({"models_root": str(models_root), **base}))
    return path


def start_engine(cfg_path: Path) -> RunningEngine:
    cfg = load_config(cfg_path)
    log = cfg.run_path / "engine.log"
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "--config", str(cfg_path), "start"],
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    eng = RunningEngine(cfg, proc, log)
    eng.wait_ready()
    return eng


_counter = iter(range(10_000))


@pytest.fixture
def engine_factory(tmp_path, models_root):
    """Start engines on demand; every one is stopped and /dev/shm checked clean afterwards."""
    started: list[RunningEngine] = []

    def make(extra: str = "", server: str = "", gpu: str = "") -> RunningEngine:
        """``extra``: TOML merged into the test configuration; ``server``, ``gpu``: more keys of those tables."""
        inst = f"t{os.getpid()}n{next(_counter)}"
        cfg_path = write_config(tmp_path / f"{inst}.toml", models_root, tmp_path / f"run_{inst}", inst, extra,
                                server, gpu)
        eng = start_engine(cfg_path)
        started.append(eng)
        return eng

    yield make
    for eng in started:
        if eng.proc.poll() is None:
            eng.stop()
        assert list_segments(eng.prefix) == [], f"{eng.prefix}* left in /dev/shm"


@pytest.fixture(scope="session")
def shared_engine(tmp_path_factory, models_root):
    """One engine for the read-mostly tests of every module a process runs (under pytest-xdist,
    one per worker): a test leaves it as it found it, the demo avatar on disk (loaded or not, a
    request loads it), no stream open. An engine start costs about 1.2 CPU-s; one per module, the
    suite started 22 of them (76 engines in all, 57 now)."""
    tmp = tmp_path_factory.mktemp("engine")
    inst = f"t{os.getpid()}m{next(_counter)}"
    eng = start_engine(write_config(tmp / "engine.toml", models_root, tmp / "run", inst))
    yield eng
    eng.stop()
    assert list_segments(eng.prefix) == [], f"{eng.prefix}* left in /dev/shm"


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class CurveKeys:
    """Key pairs made with engine.keys: ``server``, clients, and a folder of the authorised ones."""
    folder: Path

    @property
    def clients(self) -> Path:
        return self.folder / "clients"

    def client(self, name: str, server: str = "server"):
        from engine.runtime.keys import ClientKeys
        return ClientKeys.from_files(self.folder / f"{server}.key", self.folder / f"{name}.key_secret")

    def server_toml(self) -> str:
        """Lines of the engine's [server] table that turn CURVE on."""
        return (f'curve_secret_key = "{self.folder / "server.key_secret"}"\n'
                f'curve_clients = "{self.clients}"\n')


def make_keys(folder: Path, names: tuple[str, ...], authorised: tuple[str, ...]) -> CurveKeys:
    import shutil

    from engine.runtime.keys import generate
    keys = CurveKeys(folder)
    keys.clients.mkdir(parents=True)
    for name in ("server", *names):
        generate(folder, name)
    for name in authorised:
        shutil.copy(folder / f"{name}.key", keys.clients / f"{name}.key")
    return keys


# -- running in parallel (pytest-xdist: ./tools/dev test runs two workers per core, `--dist loadscope`:
#    a module's tests on one worker, so its module fixtures (a gateway, say) are made once, once
#    more for its real-time tests, and a worker's session fixtures (the shared engine) once;
#    tests/scheduling.py makes and orders the units, and tests/priority.py gives the real-time
#    tests the CPU) ------------------------------------------------
def pytest_configure(config):
    config.addinivalue_line("markers", "realtime(alone=False): asserts real-time rates or latencies; under "
                                       "pytest-xdist the other tests yield the CPU to it (a cgroup "
                                       "marked idle), or, with alone=True or where that cannot be made, it runs "
                                       "alone")


WARM_UP_KERNELS = """
import numpy as np
from engine.compositor.compositor import warm_up_kernels
from engine.kernels.image import fill_visual
warm_up_kernels()
fill_visual(np.zeros((1, 24, 24, 3), np.uint8), np.empty((1, 6, 16, 16), np.float32))
"""


def _run_root(config) -> Path:
    """The run's base temp folder (in an xdist worker: above every worker's own), for its lock files."""
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


def _kernels_lock(config) -> Path:
    """The file the kernels' compilation holds locked."""
    return _run_root(config) / "kernels.lock"


def pytest_sessionstart(session):
    """Compile the numba kernels once before any engine starts: on a fresh clone their cache is
    empty (6.6 s of one core here), and every compositor of every worker's engines would compile
    them at once. Under pytest-xdist a process does it, holding a lock, while the workers start and
    collect the tests (on the other core); each worker waits for it before its first test."""
    config = session.config
    if hasattr(config, "workerinput"):
        return                                     # an xdist worker: see pytest_collection_finish
    if not getattr(config.option, "numprocesses", None):
        exec(WARM_UP_KERNELS, {})
        return
    import fcntl
    fd = os.open(_kernels_lock(config), os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)                 # held by the child's copy of the descriptor until it ends
    config._lse_kernels = subprocess.Popen([sys.executable, "-c", WARM_UP_KERNELS], pass_fds=(fd,),
                                           cwd=Path(__file__).resolve().parents[1])
    os.close(fd)


def pytest_collection_finish(session):
    """An xdist worker waits for the controller's compilation of the kernels (pytest_sessionstart)."""
    if hasattr(session.config, "workerinput"):
        import fcntl
        path = _kernels_lock(session.config)
        if path.exists():
            with open(path) as f:
                fcntl.flock(f, fcntl.LOCK_SH)


def pytest_unconfigure(config):
    proc = getattr(config, "_lse_kernels", None)
    if proc is not None and proc.wait() != 0:      # the engines compiled what they needed themselves
        print(f"warning: compiling the numba kernels before the tests failed (exit status {proc.returncode})",
              file=sys.stderr)


def _runs_alone(item) -> bool:
    """A ``realtime`` test that has the machine to itself (under xdist): every one where the others
    cannot yield the CPU (no idle cgroup), else those marked ``realtime(alone=True)``: the
    browser tests, whose load would leave the idle cgroup no CPU for half a minute."""
    mark = item.get_closest_marker("realtime")
    return (mark is not None and hasattr(item.config, "workerinput")
            and (not cpu_classes(item.config) or mark.kwargs.get("alone", False)))


@contextlib.contextmanager
def _turn(config, exclusive: bool, name: str = "realtime"):
    """A readers-writer lock across the xdist workers (nothing outside xdist): shared, or exclusive.
    A turnstile taken first keeps a waiting exclusive holder from being overtaken by later tests."""
    if not hasattr(config, "workerinput"):
        yield
        return
    import fcntl
    root = _run_root(config)
    with open(root / f"{name}.turnstile", "a") as gate, open(root / f"{name}.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


NEXT_ITEM = pytest.StashKey()          # the test after the one being torn down (None: the last one here)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    """Lets a module fixture see, in its teardown, whether the next test uses it too
    (tests/cluster/test_cluster.py's ``cluster`` stays up for the next module that uses it)."""
    item.config.stash[NEXT_ITEM] = nextitem


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Every test but a ``realtime`` one that runs alone holds the lock shared from its setup to its
    teardown, so its fixtures too (a module's start in the setup of its first test and stop in the
    teardown of its last; the shared engine starts with the first test that uses it, stops with the
    worker's last test): none of that runs under a real-time test that runs alone, which holds it
    exclusively (:func:`_realtime_runs_alone`). A module that uses :func:`no_realtime_beside` takes
    nothing here (see there).

    With an idle cgroup (tests/priority.py), a ``realtime`` test runs in the run's own cgroup
    from its setup to its teardown (its worker moves there with what it started, and with it into
    the cgroup of its next other test), a module that uses :func:`no_realtime_beside` in ``lead``
    (beside the idle cgroup, at a low weight), the others in the idle cgroup's ``rest``."""
    realtime = item.get_closest_marker("realtime") is not None
    classes = cpu_classes(item.config)
    if classes:
        target = ("realtime" if realtime else "lead" if "no_realtime_beside" in item.fixturenames else "rest")
        if target != getattr(item.config, "_lse_class", "rest"):
            join(classes[target], with_children=True)       # the worker's engines go with it
            item.config._lse_class = target
    if not _runs_alone(item) and "no_realtime_beside" not in item.fixturenames:
        with _turn(item.config, False):
            yield
    else:
        yield


@pytest.fixture(autouse=True)
def _realtime_runs_alone(request):
    """A ``realtime`` test that runs alone (:func:`_runs_alone`) holds the lock exclusively, so its
    assertions are not measured against another worker's load."""
    if not _runs_alone(request.node):
        yield
        return
    # the test's other fixtures first (engines, browsers, bots start beside other tests), so the
    # exclusive turn covers the test itself; they are torn down after it is given back
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    for name in request.fixturenames:
        if name not in ("_realtime_runs_alone", "request") and name not in params:
            request.getfixturevalue(name)
    # a Ray cluster module running: wait for its end without the turnstile, which would stop every
    # other worker meanwhile
    with _turn(request.config, False, "background"), _turn(request.config, True):
        yield


@pytest.fixture(scope="module")
def no_realtime_beside(request):
    """No other module that uses this runs while the module does (its fixtures included), nor a
    ``realtime`` test that runs alone; other tests may: for a module whose background processes (a
    Ray cluster) load the machine the whole time, which would skew another worker's real-time
    assertions (and two Ray clusters at once would skew each other). Module fixtures that start
    such processes depend on it, so it is taken first and given back last (the cluster the two Ray
    modules share outlives the first one's turn by the moment between them: they run back to back,
    before the alone tests, which are handed out last). With the idle cgroup they run after the
    real-time tests (tests/scheduling.py), and the Ray cluster's processes are in ``lead``, at a low
    weight, beside the idle cgroup, which yields to them: in the idle cgroup, beside a browser
    test, they starved (agents silent for over 3 s, every host taken for down)."""
    with _turn(request.config, True, "background"), _turn(request.config, False):
        yield
