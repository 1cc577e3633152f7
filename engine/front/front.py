"""The front role: the client ROUTER socket and the backend socket, the loop that drains them, and
what is sent to clients.

One thread owns every socket (ZeroMQ sockets are not thread-safe); the avatar loader thread only
wakes it through a pipe. The front is the process wrapper; the work is done by parts it owns, each
on this thread:

- :class:`~engine.front.requests.Requests`: the batch and avatar methods (``composite``, ``infer``,
  ``health``, ``models``, ``load``, ``unload``): validation, then a job for the scheduler;
- :class:`~engine.front.stream_methods.StreamMethods`: ``stream_open``, ``stream_audio``,
  ``stream_close``, stream jobs and paced delivery;
- :class:`~engine.front.pipeline.Pipeline`: a job from the scheduler's choice through its ring slot,
  the GPU worker and the compositors to its reply (assembled by :mod:`engine.front.replies`);
- :class:`~engine.front.guards.Guards`: CURVE, quotas, metrics, request-scoped logs.

What runs next is decided by :class:`engine.front.scheduler.Scheduler`, asked after every turn of
the loop. A composite request goes::

    client --ROUTER--> front: parse, validate; once its avatar is in memory, queue it
    scheduler: a free ring slot of some GPU worker, earliest deadline first (streams and batches)
    front: copy the request tensors from the ZeroMQ frames into the slot (the one input copy)
    front --"run"--> GPU worker: (cut the visual input from the avatar), one Run, output into the slot
    GPU worker --"inferred"--> front --"paste" x chunks--> compositors (least loaded first)
    compositors: paste + JPEG, JPEG bytes into the slot --"pasted"--> front
    front: the JPEGs copied out of the slot into the reply, the slot freed at once
    front --ROUTER--> client: header + JPEG frames

Replies are copied out of the ring (a few hundred kB per batch) so that a client that does not
read never holds a ring slot; what it has not read counts against its own bound instead
(:mod:`engine.front.connections`).

Backend messages (ipc ROUTER; workers are DEALERs named g<k> / c<k>, the supervisor is "sup")
are documented in gpu_worker.py and compositor.py; from the supervisor: ``died`` (role, idx,
restarts) and ``status?``, answered with ``front_state``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from engine import __version__
from engine import protocol as P
from engine.avatars.disk import AvatarError
from engine.avatars.store import AvatarEntry, AvatarStore, CapacityError
from engine.front.connections import TRACK_BYTES, Connections
from engine.front.guards import Guards
from engine.front.jobs import CompHandle, GpuHandle, Job
from engine.front.pipeline import Pipeline
from engine.front.requests import Requests
from engine.front.scheduler import Scheduler, SchedulerConfig
from engine.front.security import MONITOR_EVENTS, RateLimitedLog
from engine.front.stream_methods import StreamMethods
from engine.protocol import ProtocolError
from engine.runtime.logs import request_scope
from engine.runtime.process import Role, send_msg
from engine.runtime.ring import BatchRing, SlotState

log = logging.getLogger("engine.front")
SUP = b"sup"


class Front(Role):
    role = "front"

    def __init__(self, cfg, idx: int, hb_slot: int, gpus: list[tuple[int | None, str]], compositors: int) -> None:
        super().__init__(cfg, idx, hb_slot)
        self.gpu_specs = gpus                # (device, ring name) per GPU worker
        self.n_comps = compositors

    # -- start-up ----------------------------------------------------------------------------------
    def init_process(self) -> None:
        cfg = self.cfg
        self.ctx = zmq.Context()
        self.backend = self.ctx.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.setsockopt(zmq.SNDHWM, 0)
        self.backend.setsockopt(zmq.RCVHWM, 0)
        self.backend.bind(cfg.backend_endpoint)
        self.client = self._client_socket()
        self.monitor = self.client.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED | MONITOR_EVENTS)
        self.gpus = [GpuHandle(i, dev, BatchRing.attach(name)) for i, (dev, name) in enumerate(self.gpu_specs)]
        for g in self.gpus:
            g.free = list(range(g.ring.geometry.nslots))
            for s in g.free:
                g.ring.set_state(s, SlotState.FREE)
        self.comps = [CompHandle(i) for i in range(self.n_comps)]
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.woken: deque[AvatarEntry] = deque()
        self.store = AvatarStore(cfg, self._wake, self._evicted)
        self.scheduler = Scheduler(SchedulerConfig(
            max_batch=cfg.ring.max_batch, batch_frames=cfg.streams.batch_frames,
            max_inflight_batches=cfg.streams.max_inflight_batches, run_ahead_s=cfg.scheduling.run_ahead_s,
            batch_slack_s=cfg.scheduling.batch_slack_ms / 1000, max_pending=cfg.capacity.max_pending,
            max_pending_bytes=cfg.capacity.max_pending_bytes, worker_queue=cfg.scheduling.worker_queue))
        self.conns = Connections(cfg.server.client_queue_bytes)
        self.unread_log = RateLimitedLog(log)        # a client that never reads must not flood the log
        # CURVE + ZAP on self.client (before it binds), quotas, metrics
        self.guards = Guards(cfg, self.ctx, self.client, self.conns, self.store)
        self.metrics, self.quotas, self.security = self.guards.metrics, self.guards.quotas, self.guards.security
        self.requests = Requests(self)
        self.streams = StreamMethods(self)
        self.pipeline = Pipeline(self)
        self.methods = {**{m: getattr(self.requests, f"do_{m}") for m in P.METHODS if not m.startswith("stream_")},
                        **{m: getattr(self.streams, f"do_{m}") for m in P.METHODS if m.startswith("stream_")}}
        self.accepting = False
        self.started = time.time()
        self.batches = 0
        self.frames_out = 0
        for name, mc in cfg.models.items():
            if mc.preload:
                try:
                    self.store.acquire(name, lambda e: None)
                except (AvatarError, CapacityError) as e:
                    log.error("preload of avatar %s failed: %s", name, e)

    def _client_socket(self) -> zmq.Socket:
        sc = self.cfg.server
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1_000)               # messages per connection; bytes are bounded by us
        sock.setsockopt(zmq.RCVHWM, 1_000)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)         # a send to a gone client fails instead of vanishing
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_frame_bytes())
        if sc.client_keepalive_s > 0:
            # TCP keepalive, answered by the peer's kernel, finds a vanished host (a closed socket or
            # a dead process is seen at once by the monitor). Not ZMTP heartbeats: a PING queued
            # behind replies a client has not read yet would time out a client that merely reads slowly.
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, sc.client_keepalive_s)
            sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, sc.client_keepalive_s)
            sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 2)
        return sock

    def _max_frame_bytes(self) -> int:
        """The largest message part a valid request can have (visual_frames at the largest batch);
        libzmq drops a connection that sends a bigger one."""
        face = self.cfg.ring.max_face
        return self.cfg.ring.max_batch * 6 * face * face * 4 + (1 << 20)

    def _wake(self, entry: AvatarEntry) -> None:
        self.woken.append(entry)
        os.write(self.wake_w, b"x")

    def _evicted(self, name: str, segment: str) -> None:
        for h in [*self.gpus, *self.comps]:
            self.to_backend(h.identity, {"t": "drop", "avatar": segment})

    def _all_ready(self) -> bool:
        return all(g.state == "ready" for g in self.gpus) and all(c.state == "ready" for c in self.comps)

    # -- loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        self.poller = zmq.Poller()
        self.poller.register(self.backend, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.poller.register(self.wake_r, zmq.POLLIN)
        self.guards.register(self.poller)
        self.watch_signals(self.poller)
        last_check = time.monotonic()
        while not self.stopping:
            self.beat()
            events = dict(self.poller.poll(self._poll_timeout()))
            self.guards.poll(events)
            if self.signal_r in events:
                self.drain_signals()
            if self.monitor in events:
                self._on_monitor()
            if self.backend in events:
                self._drain(self.backend, self.on_backend)
            if self.accepting and self.client in events:
                self._drain(self.client, self.on_client)
            if self.wake_r in events:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
                while self.woken:
                    self.store.finish(self.woken.popleft())
            now = time.monotonic()
            self._check_queues(now)
            self.streams.deliver(now)
            self.pipeline.run_scheduler(now)
            if not self.accepting and self._all_ready():
                self.client.bind(self.cfg.server.front)
                self.poller.register(self.client, zmq.POLLIN)
                self.accepting = True
                log.info("accepting requests on %s", self.cfg.server.front)
                self.send_state()
            if now - last_check > 1.0:
                last_check = now
                self.pipeline.expire(now)
                self.security.tick()
                self.unread_log.flush()

    def _poll_timeout(self) -> int:
        if any(c.over_since is not None and c.streams for c in self.conns.by_id.values()):
            return 10                                 # watch blocked connections with frames waiting drain
        timeout = 250
        now = time.monotonic()
        for s in self.scheduler.streams.values():
            due = s.next_due()
            if due is not None:
                timeout = min(timeout, max(0, int(1000 * (due - now)) + 1))
        return timeout

    def _drain(self, sock: zmq.Socket, handler) -> None:
        for _ in range(64):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # noqa: BLE001 - one bad message must never take the front down
                log.exception("message dropped")

    def _on_monitor(self) -> None:
        while True:
            try:
                msg = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.security.on_monitor(int(msg["event"]), int(msg["value"]))
            for identity in self.conns.on_monitor(int(msg["event"]), int(msg["value"])):
                self._client_gone(identity, forget=False)

    # -- client side: requests in ------------------------------------------------------------------
    def client_label(self, identity: bytes) -> str:
        return self.guards.client_label(identity)

    @request_scope
    def on_client(self, frames: list[zmq.Frame]) -> None:
        try:
            envelope, body = P.split_envelope(frames)
        except ProtocolError:
            return
        if self.conns.get(frames[0].bytes) is None:
            # a new connection: take the monitor's news first, so its ACCEPTED event (and the
            # DISCONNECTED of whatever used that descriptor before) is not read after its messages
            self._on_monitor()
        conn = self.conns.seen(frames[0].bytes, frames[-1])
        envelope = [f.bytes for f in envelope]     # identities are tiny; replies need plain bytes
        req = None
        try:
            req = P.parse_request(envelope, body)
            self.guards.admit(conn, req)             # logs name the request; per-key quotas
            limit = self.cfg.server.max_requests_per_client
            if conn.requests >= limit:
                raise ProtocolError(P.BUSY, f"this connection has {conn.requests} requests waiting for a reply "
                                    f"(server.max_requests_per_client = {limit})", req.id)
            if self.conns.blocked(conn.identity) and req.method != "stream_close":
                raise ProtocolError(P.BUSY, "this connection has more than server.client_queue_bytes of messages "
                                    "it has not read yet; read them first", req.id)
            conn.requests += 1
            req.held = True
            self.methods[req.method](req)
        except ProtocolError as e:
            self.answer(req, envelope, P.error_reply(e.req_id if e.req_id is not None else
                                                     (req.id if req else None), e.code, e.message))
        except Exception as e:  # noqa: BLE001 - never let one request take the front down
            log.exception("request failed")
            self.answer(req, envelope, P.error_reply(req.id if req else None, P.INTERNAL, f"internal error: {e}"))

    # -- client side: replies and events out -------------------------------------------------------
    def answer(self, req: P.Request | None, envelope: list[Any], header: bytes, body: list[Any] = ()) -> bool:
        """Send the one reply of a request (its connection's count goes down)."""
        self.guards.replied(req, header, envelope[0])   # metrics, access log (DEBUG)
        if req is not None and req.held:
            req.held = False
            conn = self.conns.get(envelope[0])
            if conn is not None:
                conn.requests -= 1
        return self.send_client([*envelope, header, *body])

    def reply_error(self, req: P.Request, code: str, message: str) -> None:
        self.answer(req, req.envelope, P.error_reply(req.id, code, message))

    def reply_ok(self, req: P.Request, result: dict[str, Any]) -> None:
        self.answer(req, req.envelope, P.ok_reply(req.id, result))

    def send_client(self, parts: list[Any]) -> bool:
        """Send one message to a client; False when it is gone or cannot take more (its streams close).
        A sizeable message is tracked: its bytes count against the connection until ZeroMQ has
        handed them to the kernel."""
        nbytes = sum(len(p.buffer) if isinstance(p, zmq.Frame) else len(p) for p in parts[1:])
        tracker = None
        if nbytes >= TRACK_BYTES and not isinstance(parts[-1], zmq.Frame):
            last = zmq.Frame(parts[-1], copy=False, track=True)
            parts = [*parts[:-1], last]
            tracker = last.tracker
        try:
            self.client.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            if e.errno == zmq.EAGAIN:
                # still connected, but its 1000-message queue is full: it keeps its record (its
                # requests are counted there), loses its streams (their events cannot reach it either)
                self.unread_log.emit("send queue full", "client %s does not read (its send queue is full): its "
                                     "streams close", parts[0].hex())
                conn = self.conns.get(parts[0])
                for sid in list(conn.streams if conn else ()):
                    s = self.scheduler.streams.get(sid)
                    if s is not None:
                        self.streams.close(s)
            else:
                self._client_gone(parts[0])
            return False
        self.conns.sent(parts[0], tracker, nbytes)
        return True

    def _client_gone(self, identity: bytes, forget: bool = True) -> None:
        """The client's connection is gone: its streams close, its queued requests are dropped."""
        for s in [s for s in self.scheduler.streams.values() if s.owner[0] == identity]:
            log.info("stream %s: client gone, closing it", s.id)
            self.streams.close(s)
        for job in [j for j in self.scheduler.pending if j.req.envelope[0] == identity]:
            self.scheduler.cancel(job)
            job.done = True
            self.pipeline.account(job)
        if forget:
            self.conns.forget(identity)

    def _check_queues(self, now: float) -> None:
        """Connections over their unread-bytes bound for too long lose their streams."""
        limit = self.cfg.server.slow_client_timeout_s
        for conn in self.conns.reap(now):
            if conn.streams and now - conn.over_since > limit:
                for sid in list(conn.streams):
                    s = self.scheduler.streams.get(sid)
                    if s is not None:
                        self.streams.close(s, (P.SLOW_CLIENT, f"the client has left {conn.queued} bytes unread for "
                                                              f"more than {limit:g} s (server.client_queue_bytes, "
                                                              "server.slow_client_timeout_s)"))

    # -- backend side ------------------------------------------------------------------------------
    def to_backend(self, identity: bytes, msg: dict[str, Any]) -> None:
        send_msg(self.backend, msg, to=identity)

    def on_backend(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        msg = json.loads(frames[1].bytes)
        t = msg.get("t")
        if ident == SUP:
            if t == "died":
                self.pipeline.on_died(msg)
                self.send_state()
            elif t == "status?":
                self.send_state()
            return
        kind, idx = chr(ident[0]), int(ident[1:])
        if kind == "g":
            self.pipeline.on_gpu(self.gpus[idx], msg)
        elif kind == "c":
            self.pipeline.on_comp(self.comps[idx], msg, frames[2:])

    def send_state(self) -> None:
        self.to_backend(SUP, {"t": "front_state", "accepting": self.accepting, "pid": os.getpid(), **self.health()})

    def health(self) -> dict[str, Any]:
        ready = [g for g in self.gpus if g.state == "ready"]
        now = time.monotonic()
        return {
            "healthy": self.accepting and bool(ready) and any(c.state == "ready" for c in self.comps),
            "inference_healthy": bool(ready),
            "loaded_models": len(self.store.loaded()),
            "max_models": self.cfg.capacity.models_per_device * max(1, len(self.gpus)),
            "version": __version__, "protocol": P.VERSION,
            "provider": sorted({g.provider for g in self.gpus if g.provider}),
            "uptime_s": round(time.time() - self.started, 1),
            "pending": len(self.scheduler.pending), "pending_bytes": self.scheduler.pending_bytes,
            "connections": len(self.conns),
            "batches": self.batches, "frames": self.frames_out,
            "background_bytes": {"used": self.store.used_bytes(), "budget": self.cfg.capacity.background_bytes},
            "gpu_workers": [{"idx": g.idx, "gpu_id": -1 if g.device is None else g.device, "provider": g.provider,
                             "state": g.state, "restarts": g.restarts, "inflight": len(g.jobs),
                             "free_slots": len(g.free), "models": sorted(g.models), "batches": g.batches,
                             "frames": g.frames, **g.stats} for g in self.gpus],
            "cold_runs": sum(g.stats.get("cold_runs", 0) for g in self.gpus),
            "compositors": [{"idx": c.idx, "state": c.state, "restarts": c.restarts,
                             "outstanding_frames": c.load, "frames": c.frames} for c in self.comps],
            "streams": [s.describe(now) for s in self.scheduler.streams.values()],
        }

    # -- stop --------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if not hasattr(self, "pipeline"):
            if hasattr(self, "ctx"):
                self.ctx.destroy(linger=0)
            return
        for e in list(self.store.entries.values()):   # requests waiting for an avatar still loading
            waiters, e.waiters = e.waiters, []
            for w in waiters:
                try:
                    w(e)                               # require_loaded answers shutting_down
                except Exception:  # noqa: BLE001
                    log.exception("a waiting request failed at shutdown")
        for s in list(self.scheduler.streams.values()):
            self.streams.close(s, (P.SHUTTING_DOWN, "the engine is stopping"))
        jobs: list[Job] = [*self.scheduler.pending, *self.pipeline.comp_waiting,
                           *(j for g in self.gpus for j in g.jobs.values())]
        for job in jobs:
            if not job.done and job.req is not None:
                job.done = True
                self.reply_error(job.req, P.SHUTTING_DOWN, "the engine is stopping")
        self.client.setsockopt(zmq.LINGER, 1000)      # let those replies leave
        self.client.disable_monitor()
        self.monitor.close(0)
        self.client.close()
        self.store.close()
        for g in self.gpus:
            g.ring.close()
        self.ctx.destroy(linger=0)

