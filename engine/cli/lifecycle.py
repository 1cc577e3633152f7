"""Start an engine in the background and wait until it is ready, stop one and wait until it is gone,
load an avatar with a progress bar: the steps ``engine-ctl start --detach``, ``stop``, ``load`` and
``demo`` take."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import click

from engine.cli.common import engine_client
from engine.runtime.config import EngineConfig
from engine.supervisor.control import control


def start_detached(cfg: EngineConfig, timeout: float = 300.0) -> None:
    running = control(cfg, "status", 1.0)
    if running is not None:
        raise click.ClickException(f"an engine already answers on {cfg.control_endpoint}")
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    log_path = cfg.log_path if cfg.server.log_file else cfg.run_path / "engine.log"
    args = [sys.executable, "-m", "engine.cli"]
    if cfg.source:
        args += ["--config", cfg.source]
    args += ["start", "--log-file", str(log_path)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(cfg.root_dir) if cfg.source else None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            raise click.ClickException("the engine exited during start-up:\n" + "\n".join(tail))
        st = control(cfg, "status", 1.0)
        if st and st.get("ready"):
            click.echo(f"engine ready (pid {proc.pid}), front {cfg.server.front}, log {log_path}")
            return
        time.sleep(0.3)
    proc.terminate()
    raise click.ClickException(f"the engine was not ready within {timeout} s; see {log_path}")


def stop_engine(cfg: EngineConfig, timeout: float = 30.0) -> None:
    from engine.supervisor.control import pid_alive, read_pid
    pid = read_pid(cfg)
    if control(cfg, "stop", 2.0) is None and pid is None:
        raise click.ClickException("no engine is running")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_pid(cfg) is None and (pid is None or not pid_alive(pid)):
            click.echo("engine stopped")
            return
        time.sleep(0.2)
    raise click.ClickException(f"the engine did not stop within {timeout} s")


def load_with_progress(cfg: EngineConfig, name: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    error: list[Exception] = []

    def do_load() -> None:
        try:
            with engine_client(cfg, 600) as c:
                result.update(c.load(name))
        except Exception as e:  # noqa: BLE001
            error.append(e)
    t = threading.Thread(target=do_load, daemon=True)
    t.start()
    with engine_client(cfg, 10) as poll, click.progressbar(length=1, label=f"loading {name}", file=sys.stderr) as bar:
        shown = 0
        while t.is_alive():
            t.join(0.2)
            try:
                m = next((m for m in poll.models() if m["name"] == name), None)
            except Exception:  # noqa: BLE001
                m = None
            if m and m.get("progress"):
                done, total = m["progress"]
                bar.length = max(total, 1)
                bar.update(done - shown)
                shown = done
        if result:
            bar.update(bar.length - shown)
    if error:
        raise click.ClickException(str(error[0]))
    click.echo(f"{name}: {result.get('frames')} frames {result.get('width')}x{result.get('height')}, "
               f"{result['memory_bytes']['backgrounds'] / 1e6:.1f} MB in shared memory, "
               f"loaded in {result.get('load_ms')} ms")
    return result
