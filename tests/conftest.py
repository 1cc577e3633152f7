"""Shared fixtures: a small demo avatar, and real engines started as separate processes."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.cli import control
from engine.config import EngineConfig, load_config
from engine.shm import list_segments
from engine.demo_avatars import make_audio_encoder, make_demo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def write_config(path: Path, models_root: Path, run_dir: Path, instance: str, extra: str = "", gpu: str = "") -> Path:
    path.write_text(f"""
models_root = "{models_root}"
[server]
front = "tcp://127.0.0.1:{free_port()}"
run_dir = "{run_dir}"
instance = "{instance}"
[gpu]
devices = []
intra_op_threads = 1
{gpu}
[compositor]
processes = 2
[ring]
slots = 3
[supervision]
max_restarts = 3
heartbeat_timeout_s = 30
request_timeout_s = 30
{extra}
""")
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

    def make(extra: str = "", gpu: str = "") -> RunningEngine:
        """``extra``: TOML appended to the test configuration; ``gpu``: more keys of its [gpu] table."""
        inst = f"t{os.getpid()}n{next(_counter)}"
        cfg_path = write_config(tmp_path / f"{inst}.toml", models_root, tmp_path / f"run_{inst}", inst, extra, gpu)
        eng = start_engine(cfg_path)
        started.append(eng)
        return eng

    yield make
    for eng in started:
        if eng.proc.poll() is None:
            eng.stop()
        assert list_segments(eng.prefix) == [], f"{eng.prefix}* left in /dev/shm"


@pytest.fixture(scope="module")
def shared_engine(tmp_path_factory, models_root):
    """One engine for a whole test module (read-mostly tests)."""
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
