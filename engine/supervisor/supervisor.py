"""The supervisor: owns the shared memory, starts and watches every engine process.

It creates the heartbeat segment and one batch ring per GPU worker (and unlinks them at stop),
then starts, without ever loading CUDA itself, the front, one GPU worker per (GPU, slot) and the
compositor pool. They are forked from a fork server (multiprocessing's ``forkserver`` method) that
has loaded their modules and kernels once (:mod:`engine.supervisor.preload`): a child, and a dead
one's replacement, starts without importing them again. It answers ``engine-ctl`` on the control
socket. Signals only set a flag; the loop does the work (gunicorn's arbiter).

A child that dies is respawned and the front is told, so it fails or re-dispatches what that
child held; a child that fails at boot (exit code ``EXIT_BOOT``) or dies more than
``supervision.max_restarts`` times within ``restart_window_s`` stops the engine with a message
that names it. When the front dies, every child is restarted (the front held all request state).
A child whose heartbeat is older than ``heartbeat_timeout_s`` is killed and replaced.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import psutil
import zmq

from engine import __version__
from engine.front.security import SecurityError, preflight
from engine.runtime.config import EngineConfig
from engine.runtime.logs import end_redirect, redirect_std_to
from engine.runtime.process import EXIT_BOOT, Heartbeats, run_role, send_msg, setup_logging
from engine.runtime.ring import BatchRing, RingGeometry
from engine.runtime.shm import SHM_DIR, list_segments, remove_stale
from engine.supervisor.control import read_pid
from engine.supervisor.metrics_server import MetricsServer

log = logging.getLogger("engine.supervisor")


class EngineStopped(Exception):
    """The engine stopped because a child could not be kept running."""


@dataclass(eq=False)
class Child:
    role: str
    idx: int
    hb_slot: int
    cls: str                                   # the role's class, "module:Class": made in the child
    args: tuple
    process: Any = None
    started: float = 0.0
    restarts: int = 0
    deaths: deque = field(default_factory=deque)
    state: str = "starting"

    @property
    def label(self) -> str:
        return f"{self.role}-{self.idx}"


class Supervisor:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.children: list[Child] = []
        self.signals: deque[int] = deque()
        self.stopping = False
        self.ready = False
        self.front_state: dict[str, Any] = {}
        self.fatal = ""
        self.started = time.time()

    # -- set-up ------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        cfg = self.cfg
        inst = cfg.server.instance
        self._preflight()                           # secure by default; key files (engine.security)
        cfg.run_path.mkdir(parents=True, exist_ok=True)
        other = read_pid(cfg)
        if other is not None and other != os.getpid():
            raise EngineStopped(f"an engine is already running with pid {other} ({cfg.run_path / 'engine.pid'})")
        stale = remove_stale(f"{inst}_")
        if stale:
            log.warning("removed %d shared-memory segments left by an engine that did not stop cleanly: %s",
                        len(stale), ", ".join(stale))
        (cfg.run_path / "engine.pid").write_text(f"{os.getpid()}\n")
        self.heartbeats = Heartbeats.create(f"{inst}_hb")
        devices: list[int | None] = list(cfg.gpu_devices()) or [None]
        geo = RingGeometry.for_face(cfg.ring.slots, cfg.ring.max_batch, cfg.ring.max_face)
        self.rings: list[BatchRing] = []
        specs: list[tuple[int | None, str]] = []
        k = 0
        for dev in devices:
            for _ in range(cfg.gpu.slots(dev is not None)):
                ring = BatchRing.create(f"{inst}_ring_g{k}", geo)
                self.rings.append(ring)
                specs.append((dev, ring.name))
                k += 1
        log.info("engine %s: %d GPU worker(s) on %s, %d compositor(s), rings of %d x %.0f MB",
                 __version__, len(specs), "CPU provider" if devices == [None] else f"GPUs {devices}",
                 cfg.compositor_count(), geo.nslots, geo.slot_bytes / 1e6)
        slot = iter(range(1024))
        ncomp = cfg.compositor_count()
        self.children.append(Child("front", 0, next(slot), "engine.front.front:Front", (cfg, 0, 0, specs, ncomp)))
        for i, (dev, name) in enumerate(specs):
            hb = next(slot)
            self.children.append(Child("gpu", i, hb, "engine.worker.gpu_worker:GpuWorker", (cfg, i, hb, dev, name)))
        for i in range(ncomp):
            hb = next(slot)
            self.children.append(Child("compositor", i, hb, "engine.compositor.compositor:Compositor", (cfg, i, hb)))
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(cfg.control_endpoint)
        self.backend = self.ctx.socket(zmq.DEALER)
        self.backend.setsockopt(zmq.IDENTITY, b"sup")
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.connect(cfg.backend_endpoint)
        self.mp = mp.get_context("forkserver")
        self.mp.set_forkserver_preload(["engine.supervisor.preload"])
        self._start_metrics()                       # before any child: they inherit the metrics folder

    def _preflight(self) -> None:
        try:
            for warning in preflight(self.cfg):
                log.warning("%s", warning)
        except SecurityError as e:
            raise EngineStopped(str(e)) from None

    def _start_metrics(self) -> None:
        self.metrics: MetricsServer | None = None
        if self.cfg.server.metrics:
            self.metrics = MetricsServer(self)
            try:
                self.metrics.start()
            except OSError as e:
                raise EngineStopped(str(e)) from None

    def _spawn(self, child: Child) -> None:
        self.heartbeats.times[child.hb_slot] = time.monotonic()
        p = self.mp.Process(target=run_role, args=(child.cls, child.args, os.getpid()), name=f"lse-{child.label}",
                            daemon=False)
        p.start()
        child.process, child.started, child.state = p, time.monotonic(), "starting"
        log.info("spawned %s (pid %d)", child.label, p.pid)

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; returns the process exit code (0 clean stop, 1 fatal)."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda s, f: self.signals.append(s))
        try:
            self._prepare()
            for child in self.children:
                self._spawn(child)
            self._loop()
        except EngineStopped as e:
            self.fatal = str(e)
        finally:
            self._teardown()
        if self.fatal:
            log.error("engine stopped: %s", self.fatal)
            return 1
        log.info("engine stopped")
        return 0

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        last_ask = 0.0
        self.t_boot = time.monotonic()
        while not self.stopping:
            while self.signals:
                sig = self.signals.popleft()
                log.info("received %s, stopping", signal.Signals(sig).name)
                self.stopping = True
            if self.stopping:
                break
            events = dict(poller.poll(200))
            if self.backend in events:
                self._on_backend()
            if self.control in events:
                self._on_control()
            self._reap()
            self._check_heartbeats()
            now = time.monotonic()
            if now - last_ask > (1.0 if self.ready else 0.25):
                last_ask = now
                send_msg(self.backend, {"t": "status?"})
            if not self.ready and now - self.t_boot > self.cfg.supervision.ready_timeout_s:
                raise EngineStopped(f"the engine did not become ready within supervision.ready_timeout_s = "
                                    f"{self.cfg.supervision.ready_timeout_s} s; states: "
                                    + ", ".join(f"{c.label}={c.state}" for c in self.children))

    def _on_backend(self) -> None:
        while True:
            try:
                frames = self.backend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = json.loads(frames[0])
            if msg.get("t") == "front_state":
                front = next(c for c in self.children if c.role == "front")
                if front.process is None or msg.get("pid") != front.process.pid:
                    continue                            # from a front that has died since: stale
                self.front_state = msg
                states = {("gpu", w["idx"]): w["state"] for w in msg.get("gpu_workers", [])}
                states.update({("compositor", c["idx"]): c["state"] for c in msg.get("compositors", [])})
                for c in self.children:
                    if c.role == "front":
                        c.state = "ready" if msg.get("accepting") else "starting"
                    elif c.state != "dead":
                        c.state = states.get((c.role, c.idx), c.state)
                if msg.get("accepting") and not self.ready:
                    self.ready = True
                    log.info("engine ready: front on %s, control on %s", self.cfg.server.front,
                             self.cfg.control_endpoint)

    def _on_control(self) -> None:
        frames = self.control.recv_multipart()
        envelope, body = frames[:-1], frames[-1]
        try:
            cmd = json.loads(body).get("cmd")
        except (ValueError, AttributeError):
            cmd = None
        if cmd == "status":
            reply = {"status": "ok", **self.status()}
        elif cmd == "stop":
            reply = {"status": "ok", "stopping": True}
            self.stopping = True
        else:
            reply = {"status": "error", "error": {"code": "bad_request", "message": f"unknown command {cmd!r}; "
                                                   "known: status, stop"}}
        self.control.send_multipart([*envelope, json.dumps(reply).encode()])

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        procs = [{"role": "supervisor", "idx": 0, "pid": os.getpid(), "state": "ready" if self.ready else "starting",
                  "restarts": 0, "uptime_s": round(time.time() - self.started, 1), **_memory(os.getpid())}]
        for c in self.children:
            pid = c.process.pid if c.process is not None else None
            procs.append({"role": c.role, "idx": c.idx, "pid": pid, "state": c.state, "restarts": c.restarts,
                          "uptime_s": round(now - c.started, 1) if c.started else 0.0,
                          **_memory(pid)})
        inst = self.cfg.server.instance
        shm = []
        for name in list_segments(f"{inst}_"):
            st = (SHM_DIR / name).stat()
            shm.append({"name": name, "size": st.st_size, "resident": st.st_blocks * 512})
        return {"ready": self.ready, "version": __version__, "front": self.cfg.server.front, "processes": procs,
                "shared_memory": shm, "engine": {k: v for k, v in self.front_state.items() if k != "t"},
                "fatal": self.fatal or None}

    def _reap(self) -> None:
        for child in self.children:
            p = child.process
            if p is None or p.is_alive():
                continue
            code = p.exitcode
            p.join(0)
            child.process = None
            self._on_death(child, code)

    def _on_death(self, child: Child, code: int | None) -> None:
        cfg = self.cfg.supervision
        now = time.monotonic()
        if code == EXIT_BOOT:
            raise EngineStopped(f"{child.label} could not start (exit code {code}); see its log above")
        child.deaths.append(now)
        while child.deaths and now - child.deaths[0] > cfg.restart_window_s:
            child.deaths.popleft()
        if len(child.deaths) > cfg.max_restarts:
            raise EngineStopped(f"{child.label} died {len(child.deaths)} times within {cfg.restart_window_s:.0f} s "
                                f"(last exit code {code}): crash loop, giving up")
        child.restarts += 1
        log.warning("%s died (exit code %s); respawning (restart %d)", child.label, code, child.restarts)
        if child.role == "front":
            # every in-flight request lived in the front: restart the whole set, rings start empty.
            # Each replaced process counts a restart (it was replaced), not a death (it did not
            # fail: the crash-loop limit is about processes that die on their own). The engine is
            # starting again, so it gets supervision.ready_timeout_s again from now.
            self.ready = False
            self.t_boot = now
            for other in self.children:
                if other is not child and other.process is not None:
                    other.process.kill()
                    other.process.join(5)
                    other.process = None
                    other.restarts += 1
            left = remove_stale(f"{self.cfg.server.instance}_av_")
            if left:
                log.warning("removed the dead front's avatar segments: %s", ", ".join(left))
            for other in self.children:
                self._spawn(other)
            return
        send_msg(self.backend, {"t": "died", "role": child.role, "idx": child.idx, "restarts": child.restarts})
        self._spawn(child)

    def _check_heartbeats(self) -> None:
        limit = self.cfg.supervision.heartbeat_timeout_s
        now = time.monotonic()
        for child in self.children:
            p = child.process
            if p is None or not p.is_alive():
                continue
            last = self.heartbeats.times[child.hb_slot]
            if now - last > limit:
                log.error("%s sent no heartbeat for %.0f s: killing it", child.label, now - last)
                p.kill()

    # -- tear-down ---------------------------------------------------------------------------------
    def _teardown(self) -> None:
        alive = [c.process for c in self.children if c.process is not None]
        for p in alive:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 10
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in alive:
            if p.is_alive():
                log.warning("%s did not stop in 10 s: killing it", p.name)
                p.kill()
                p.join(5)
        if not any(p.is_alive() for p in alive):
            stop_mp_helpers()
        if getattr(self, "metrics", None) is not None:
            self.metrics.stop()
        for ring in getattr(self, "rings", []):
            ring.close()
        if hasattr(self, "heartbeats"):
            self.heartbeats.close()
        if hasattr(self, "ctx"):
            self.ctx.destroy(linger=0)
        # a child killed with SIGKILL cannot unlink what it owned (the front's avatars): do it here
        left = remove_stale(f"{self.cfg.server.instance}_")
        if left:
            log.warning("removed %d segments left by killed children: %s", len(left), ", ".join(left))
        for name in ("engine.pid", "control.sock", "backend.sock"):
            try:
                pid_file = self.cfg.run_path / name
                if name != "engine.pid" or pid_file.read_text().split()[0] == str(os.getpid()):
                    pid_file.unlink()
            except (OSError, IndexError):
                pass


def stop_mp_helpers() -> None:
    """Stop multiprocessing's fork server and resource tracker once every child is gone: each lives
    until its pipe closes, and would hold the log pipe (``server.log_file``: the supervisor's last
    lines waited 2 s for them) until the supervisor's exit. CPython's own ``_stop`` (its tests use
    them), where there is one."""
    from multiprocessing import forkserver, resource_tracker
    for helper in (getattr(forkserver, "_forkserver", None), getattr(resource_tracker, "_resource_tracker", None)):
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            try:
                stop()
            except OSError as e:
                log.warning("could not stop %s: %s", type(helper).__name__, e)


def _memory(pid: int | None) -> dict[str, int]:
    """RSS (shared-memory pages it touched included) and USS (memory only this process holds)."""
    try:
        m = psutil.Process(pid).memory_full_info()
        return {"rss_bytes": m.rss, "uss_bytes": m.uss}
    except (psutil.Error, TypeError, ValueError):
        return {"rss_bytes": 0, "uss_bytes": 0}


def run_supervisor(cfg: EngineConfig) -> int:
    pump = redirect_std_to(cfg.log_path, cfg.server.log_max_bytes, cfg.server.log_backups) if cfg.server.log_file \
        else None
    setup_logging(cfg.server.log_level, "supervisor", cfg.server.log_format)
    code = Supervisor(cfg).run()
    if pump is not None:
        end_redirect(pump)
    return code

