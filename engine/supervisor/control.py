"""The client side of the supervisor's control socket (``status``, ``stop``): what ``engine-ctl``
and the test fixtures use to ask a running engine about its processes; and :func:`pid_alive`,
:func:`read_pid`: whether an engine's supervisor (its ``engine.pid``) lives."""
from __future__ import annotations

import json
from typing import Any

import psutil
import zmq

from engine.runtime.config import EngineConfig


def control(cfg: EngineConfig, cmd: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """Ask the supervisor; None when no engine answers."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(cfg.control_endpoint)
        sock.send_multipart([b"", json.dumps({"cmd": cmd}).encode()])
        if not sock.poll(int(timeout * 1000)):
            return None
        return json.loads(sock.recv_multipart()[-1])
    finally:
        sock.close(0)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_pid(cfg: EngineConfig) -> int | None:
    try:
        pid = int((cfg.run_path / "engine.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid) else None
