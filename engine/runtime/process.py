"""What every engine child process shares: start-up, signals, heartbeat, the backend channel.

The supervisor names a role's class (``Front``, ``GpuWorker``, ``Compositor``, as "module:Class")
and its plain arguments; the child, forked from the supervisor's fork server, makes it
(:func:`run_role`; its ``__init__`` only stores values), and :meth:`Role.main` calls
``init_process()`` (sockets, shared memory, models) and then ``run()``.

Exit codes tell the supervisor why a child ended: 0 asked to stop, ``EXIT_BOOT`` could not start
(the supervisor stops the engine with a message that names it), anything else a crash.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import select
import signal
import sys
import time
from typing import Any

import numpy as np
import zmq

from engine.runtime.config import EngineConfig
from engine.runtime.logs import setup_logging  # noqa: F401  (every process's logging; re-exported for the supervisor)
from engine.runtime.shm import Segment

EXIT_BOOT = 3
HEARTBEAT_SLOTS = 1024

log = logging.getLogger("engine.process")


def send_msg(sock: zmq.Socket, obj: dict[str, Any], *frames: Any, to: bytes | None = None) -> None:
    """One backend message: [identity (ROUTER side)] JSON, then raw frames."""
    parts: list[Any] = [to] if to is not None else []
    parts.append(json.dumps(obj, separators=(",", ":")).encode())
    parts.extend(frames)
    sock.send_multipart(parts, copy=False)


class Heartbeats:
    """One float64 per child in a supervisor-owned segment: the child's last sign of life."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.times = segment.array((HEARTBEAT_SLOTS,), np.float64)

    @classmethod
    def create(cls, name: str) -> Heartbeats:
        hb = cls(Segment(name, HEARTBEAT_SLOTS * 8, create=True))
        hb.times[:] = 0.0
        return hb

    @classmethod
    def attach(cls, name: str) -> Heartbeats:
        return cls(Segment(name))

    def beat(self, idx: int) -> None:
        self.times[idx] = time.monotonic()

    def close(self) -> None:
        self.times = None  # type: ignore[assignment]
        self.segment.close()


def run_role(cls: str, args: tuple, supervisor: int) -> None:
    """A child's entry point: make the role ``cls`` ("module:Class") with ``args`` and run it. The
    supervisor names the class, so it never imports the roles' own modules, nor onnxruntime, numba
    or OpenCV (the fork server it starts its children from has them loaded)."""
    module, name = cls.split(":")
    getattr(importlib.import_module(module), name)(*args).main(supervisor)


class Role:
    """Base of a child process role. Subclasses set ``role`` and implement init_process/run."""

    role = "child"

    def __init__(self, cfg: EngineConfig, idx: int, hb_slot: int) -> None:
        self.cfg = cfg
        self.idx = idx
        self.hb_slot = hb_slot
        self.stopping = False

    @property
    def identity(self) -> bytes:
        return f"{self.role[0]}{self.idx}".encode()

    @property
    def label(self) -> str:
        return f"{self.role}-{self.idx}"

    def main(self, supervisor: int) -> None:
        """Entry point in the child (forked from the supervisor's fork server, whose pid is
        ``supervisor``)."""
        setup_logging(self.cfg.server.log_level, self.label, self.cfg.server.log_format)
        self.supervisor = supervisor
        # the supervisor is not our parent (the fork server is, and lives as long as we hold its
        # pipe): a pidfd says when it is gone, kill -9 included
        try:
            self.supervisor_fd: int | None = os.pidfd_open(self.supervisor)
        except ProcessLookupError:
            self.supervisor_fd = None
            self.stopping = True
        # Ctrl-C reaches the whole process group: only the supervisor reacts, then stops us cleanly
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)
        # a signal also writes a byte here, so a loop that polls this fd wakes at once to stop,
        # instead of when its poll times out
        self.signal_r, signal_w = os.pipe()
        os.set_blocking(self.signal_r, False)
        os.set_blocking(signal_w, False)
        signal.set_wakeup_fd(signal_w)
        self.heartbeats = Heartbeats.attach(f"{self.cfg.server.instance}_hb")
        self.beat()
        try:
            self.init_process()
        except Exception:
            log.exception("%s failed to start", self.label)
            sys.exit(EXIT_BOOT)
        try:
            self.run()
        except Exception:
            log.exception("%s crashed", self.label)
            os._exit(1)
        finally:
            self.shutdown()
        sys.exit(0)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def watch_signals(self, poller: zmq.Poller) -> None:
        """Let ``poller`` wake when a signal arrives (SIGTERM: stop now, not at the next timeout)."""
        poller.register(self.signal_r, zmq.POLLIN)

    def drain_signals(self) -> None:
        try:
            os.read(self.signal_r, 4096)
        except (BlockingIOError, OSError):
            pass

    def beat(self) -> None:
        self.heartbeats.beat(self.hb_slot)
        if self.supervisor_fd is None or select.select([self.supervisor_fd], [], [], 0)[0]:
            # the supervisor is gone (kill -9): stop too; its next start removes what it owned
            if not self.stopping:
                log.warning("%s: supervisor %d is gone, stopping", self.label, self.supervisor)
            self.stopping = True

    def init_process(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release what init_process took (sockets, mappings). Owned segments are unlinked."""

    def serve(self) -> None:
        """Worker loop: beat, then hand each backend message to ``handle_<t>(msg)``."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        self.watch_signals(poller)
        while not self.stopping:
            self.beat()
            events = dict(poller.poll(1000))
            if self.signal_r in events:
                self.drain_signals()
            if self.sock not in events:
                continue
            msg = json.loads(self.sock.recv_multipart()[0])
            handler = getattr(self, f"handle_{msg.get('t')}", None)
            if handler is None:
                log.warning("%s: unknown message %r", self.label, msg.get("t"))
                continue
            handler(msg)

    def backend_socket(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.cfg.backend_endpoint)
        return sock
