"""The engine a latency suite runs against: one started for the session from a config (its own
port, shared-memory instance and run dir in a temporary folder; stopped, and ``/dev/shm`` checked,
however the tests end), or an existing one named by its endpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.runtime.derived import absolute_paths, free_port, write_derived
from engine.runtime.keys import ClientKeys

class EngineStartError(RuntimeError):
    """The engine under test did not start; the message carries its log's tail."""


@dataclass
class EngineUnderTest:
    endpoint: str
    keys: ClientKeys | None = None
    proc: subprocess.Popen | None = None        # None: an engine started by someone else
    config: Path | None = None
    log: Path | None = None
    instance: str = ""

    @property
    def started_here(self) -> bool:
        return self.proc is not None

    def client(self, timeout: float = 120.0):
        from engine.client import Client
        return Client(self.endpoint, timeout=timeout, keys=self.keys)

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """Stop an engine started here (SIGTERM, then SIGKILL of its process group) and fail if it
        left shared memory behind."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            from engine.runtime.config import load_config
            from engine.supervisor.control import control
            control(load_config(self.config), "stop", 2.0)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise EngineStartError(f"the engine did not stop within {timeout} s:\n{self.log_tail()}") from None
        from engine.runtime.shm import list_segments
        left = list_segments(f"{self.instance}_")
        if left:
            raise EngineStartError(f"the engine left shared memory behind: {left}")


def prepared_config(config: Path | None, tmp: Path) -> tuple[Path, str]:
    """The config the engine under test runs: the user's (or, without one, the demo avatar made in
    ``tmp``) with its own front port, run dir and shared-memory instance, paths made absolute."""
    if config is None:
        from engine.cli.demo_avatars import ensure_avatars
        models = tmp / "models"
        ensure_avatars(models, names=("demo",), frames=25)
        data: dict[str, Any] = {"models_root": str(models)}
    else:
        data = absolute_paths(tomllib.loads(config.read_text()), config.resolve().parent)
    instance = f"lt{os.getpid()}x{int(time.time() * 1000) % 100000}"
    path = tmp / "engine.toml"
    write_derived(data, path, front=f"tcp://127.0.0.1:{free_port()}", run_dir=tmp / "run", instance=instance)
    return path, instance


def start(config: Path | None, tmp: Path, keys: ClientKeys | None = None, timeout: float = 300.0) -> EngineUnderTest:
    """Start an engine from ``config`` (see :func:`prepared_config`) and wait until it is ready."""
    from engine.runtime.config import load_config
    from engine.supervisor.control import control
    path, instance = prepared_config(config, tmp)
    cfg = load_config(path)
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    log = cfg.run_path / "engine.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "--config", str(path), "start"], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    eng = EngineUnderTest(cfg.server.front, keys, proc, path, log, instance)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineStartError(f"the engine exited during start-up (config {path}):\n{eng.log_tail()}")
        st = control(cfg, "status", 1.0)
        if st and st.get("ready") and all(p["state"] == "ready" for p in st["processes"]):
            return eng
        time.sleep(0.3)
    eng.stop()
    raise EngineStartError(f"the engine was not ready within {timeout} s:\n{eng.log_tail()}")
