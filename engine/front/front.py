"""The front: the client ROUTER socket, request handling and reply assembly.

One thread owns every socket (ZeroMQ sockets are not thread-safe); the avatar loader thread only
wakes it through a pipe. What runs next is decided by :class:`engine.front.scheduler.Scheduler`, asked
after every turn of the loop. A composite request goes::

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

import itertools
import json
import logging
import os
import time
from collections import deque
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from engine import __version__
from engine import protocol as P
from engine.avatars.frames import AvatarError, UnknownAvatar
from engine.avatars.disk import ring_room_error
from engine.avatars.store import AvatarEntry, AvatarStore, CapacityError
from engine.runtime.config import WRAP_MODES
from engine.front.connections import TRACK_BYTES, Connections
from engine.front.guards import Guards
from engine.front.stream_methods import StreamMethods
from engine.front.jobs import CompHandle, GpuHandle, Job
from engine.kernels.image import frame_index
from engine.runtime.logs import request_scope
from engine.runtime.process import Role, send_msg
from engine.protocol import ProtocolError
from engine.runtime.ring import BatchRing, SlotState
from engine.front.scheduler import QueueFull, Scheduler, SchedulerConfig, WorkerView
from engine.front.security import MONITOR_EVENTS

log = logging.getLogger("engine.front")
SUP = b"sup"


class Front(StreamMethods, Guards, Role):
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
        self._init_guards()                          # CURVE + ZAP on self.client (before it binds), quotas, metrics
        self.comp_waiting: deque[Job] = deque()
        self.loading_bytes = 0                       # tensors of batch requests waiting for their avatar
        self.seq = itertools.count(int(time.time()) & 0xFFFF)
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
            send_msg(self.backend, {"t": "drop", "avatar": segment}, to=h.identity)

    def _all_ready(self) -> bool:
        return all(g.state == "ready" for g in self.gpus) and all(c.state == "ready" for c in self.comps)

    # -- loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        self.poller = zmq.Poller()
        self.poller.register(self.backend, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.poller.register(self.wake_r, zmq.POLLIN)
        self._register_guards(self.poller)
        last_check = time.monotonic()
        while not self.stopping:
            self.beat()
            events = dict(self.poller.poll(self._poll_timeout()))
            self._poll_guards(events)
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
            self._deliver_streams(now)
            self._run_scheduler(now)
            if not self.accepting and self._all_ready():
                self.client.bind(self.cfg.server.front)
                self.poller.register(self.client, zmq.POLLIN)
                self.accepting = True
                log.info("accepting requests on %s", self.cfg.server.front)
                self._send_state()
            if now - last_check > 1.0:
                last_check = now
                self._expire(now)
                self.security.tick()

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

    def _views(self) -> list[WorkerView]:
        return [WorkerView(g.idx, g.device, len(g.free), len(g.jobs), set(g.models), g.state == "ready",
                           sum(1 for j in g.jobs.values() if not j.inferred)) for g in self.gpus]

    def _startable(self) -> int:
        """Jobs the workers could take right now (``capacity.max_pending`` counts what waits beyond)."""
        return sum(w.room(self.cfg.scheduling.worker_queue) for w in self._views())

    def _run_scheduler(self, now: float) -> None:
        views = self._views()
        for d in self.scheduler.schedule(now, views):
            g = self.gpus[d.worker]
            job = d.batch if d.batch is not None else self._stream_job(d.streams)
            self._guard(job, lambda j: self._start(j, g, g.free.pop(0)))
        for name in self.scheduler.wanted:
            self._load_elsewhere(name)

    def _load_elsewhere(self, name: str) -> None:
        """Work for ``name`` waits and no worker with room holds its network: one more worker loads
        it in its loader thread (one load of a network at a time), serving its other networks
        meanwhile (docs/architecture.md, "GPU workers")."""
        e = self.store.entries.get(name)
        ready = [g for g in self.gpus if g.state == "ready"]
        if e is None or e.state != "loaded" or any(name in g.loading for g in ready):
            return
        cands = [g for g in ready if name not in g.models]
        if not cands:
            return
        pref = e.model.preferred_gpu
        g = min(cands, key=lambda g: (pref is not None and g.device != pref, len(g.loading), len(g.jobs), g.idx))
        g.loading.add(name)
        send_msg(self.backend, {"t": "load", "model": name, "onnx": str(e.files.onnx)}, to=g.identity)

    # -- client side -------------------------------------------------------------------------------
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
            self._admit(conn, req)                   # logs name the request; per-key quotas
            limit = self.cfg.server.max_requests_per_client
            if conn.requests >= limit:
                raise ProtocolError(P.BUSY, f"this connection has {conn.requests} requests waiting for a reply "
                                    f"(server.max_requests_per_client = {limit})", req.id)
            if self.conns.blocked(conn.identity) and req.method != "stream_close":
                raise ProtocolError(P.BUSY, "this connection has more than server.client_queue_bytes of messages "
                                    "it has not read yet; read them first", req.id)
            conn.requests += 1
            req.held = True
            getattr(self, f"do_{req.method}")(req)
        except ProtocolError as e:
            self._answer(req, envelope, P.error_reply(e.req_id if e.req_id is not None else
                                                      (req.id if req else None), e.code, e.message))
        except Exception as e:  # noqa: BLE001 - never let one request take the front down
            log.exception("request failed")
            self._answer(req, envelope, P.error_reply(req.id if req else None, P.INTERNAL, f"internal error: {e}"))

    def _answer(self, req: P.Request | None, envelope: list[Any], header: bytes, body: list[Any] = ()) -> bool:
        """Send the one reply of a request (its connection's count goes down)."""
        self._replied(req, header)                   # metrics, access log (DEBUG)
        if req is not None and req.held:
            req.held = False
            conn = self.conns.get(envelope[0])
            if conn is not None:
                conn.requests -= 1
        return self._send_client([*envelope, header, *body])

    def _send_client(self, parts: list[Any]) -> bool:
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
                log.warning("client %s does not read (its send queue is full): its streams close", parts[0].hex())
                conn = self.conns.get(parts[0])
                for sid in list(conn.streams if conn else ()):
                    s = self.scheduler.streams.get(sid)
                    if s is not None:
                        self._close_stream(s)
            else:
                self._client_gone(parts[0])
            return False
        self.conns.sent(parts[0], tracker, nbytes)
        return True

    def reply_error(self, req: P.Request, code: str, message: str) -> None:
        self._answer(req, req.envelope, P.error_reply(req.id, code, message))

    def reply_ok(self, req: P.Request, result: dict[str, Any]) -> None:
        self._answer(req, req.envelope, P.ok_reply(req.id, result))

    def _client_gone(self, identity: bytes, forget: bool = True) -> None:
        """The client's connection is gone: its streams close, its queued requests are dropped."""
        for s in [s for s in self.scheduler.streams.values() if s.owner[0] == identity]:
            log.info("stream %s: client gone, closing it", s.id)
            self._close_stream(s)
        for job in [j for j in self.scheduler.pending if j.req.envelope[0] == identity]:
            self.scheduler.cancel(job)
            job.done = True
            self._account(job)
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
                        self._close_stream(s, (P.SLOW_CLIENT, f"the client has left {conn.queued} bytes unread for "
                                                              f"more than {limit:g} s (server.client_queue_bytes, "
                                                              "server.slow_client_timeout_s)"))

    def do_health(self, req: P.Request) -> None:
        self.reply_ok(req, self.health())

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

    def do_models(self, req: P.Request) -> None:
        models = self.store.describe()
        for m in models:        # issue 7: each worker's report on the network (precision, path, fp16 error)
            m["precision"] = self.cfg.precision(m["name"])
            m["networks"] = [{"worker": g.idx, **g.stats["networks"][m["name"]]} for g in self.gpus
                             if m["name"] in g.stats.get("networks", {})]
        self.reply_ok(req, {"models": models})

    def _require_loaded(self, e: AvatarEntry) -> None:
        """A waiter's check: the avatar is in memory, or the reason it is not, with its code."""
        if self.stopping:
            raise ProtocolError(P.SHUTTING_DOWN, "the engine is stopping")
        if e.state != "loaded":
            raise ProtocolError(P.CAPACITY if e.capacity_error else P.MODEL_ERROR,
                                f"avatar {e.name} could not be loaded: {e.error}")

    def _acquire(self, name: str, waiter) -> None:
        try:
            self.store.acquire(name, waiter)
        except UnknownAvatar as e:
            raise ProtocolError(P.UNKNOWN_MODEL, str(e)) from None
        except AvatarError as e:
            raise ProtocolError(P.MODEL_ERROR, str(e)) from None
        except CapacityError as e:
            raise ProtocolError(P.CAPACITY, str(e)) from None

    def do_load(self, req: P.Request) -> None:
        name = P.check_str(req.params, "model", req_id=req.id)

        def loaded(e: AvatarEntry) -> None:
            self._require_loaded(e)
            g = self._pick_gpu(e)
            if g is not None:
                send_msg(self.backend, {"t": "load", "model": name, "onnx": str(e.files.onnx)}, to=g.identity)
                if name not in g.models:
                    g.loading.add(name)
            self.reply_ok(req, e.describe())
        self._acquire(name, lambda e: self._guard_request(req, loaded, e))

    def _pick_gpu(self, e: AvatarEntry) -> GpuHandle | None:
        """The GPU worker to load an avatar's network on ahead of its requests."""
        cands = [g for g in self.gpus if g.state == "ready"]
        pref = e.model.preferred_gpu
        return min(cands, key=lambda g: (e.name not in g.models, pref is not None and g.device != pref,
                                         len(g.jobs), g.idx), default=None)

    def do_unload(self, req: P.Request) -> None:
        name = P.check_str(req.params, "model", req_id=req.id)
        if name not in self.store.names():
            raise ProtocolError(P.UNKNOWN_MODEL, f"unknown avatar {name!r}", req.id)
        try:
            unloaded = self.store.unload(name)
        except CapacityError as e:
            raise ProtocolError(P.BUSY, str(e), req.id) from None
        for g in self.gpus:
            send_msg(self.backend, {"t": "unload", "model": name}, to=g.identity)
        self.reply_ok(req, {"model": name, "unloaded": unloaded})

    def do_composite(self, req: P.Request) -> None:
        self._batch_request(req)

    def do_infer(self, req: P.Request) -> None:
        self._batch_request(req)

    def _batch_request(self, req: P.Request) -> None:
        p = req.params
        name = P.check_str(p, "model", req_id=req.id)
        batch = P.check_int(p, "batch_size", 1, self.cfg.ring.max_batch, req_id=req.id)
        start = P.check_int(p, "start_frame", 0, P.MAX_FRAME - batch, default=0, req_id=req.id)
        wrap = p.get("wrap")
        if wrap is not None:
            wrap = P.check_str(p, "wrap", WRAP_MODES, req_id=req.id)
        unknown = set(req.buffers) - {"audio_features", "visual_frames"}
        if unknown:
            raise ProtocolError(P.BAD_PAYLOAD, f"unknown buffer(s) {sorted(unknown)}; a {req.method} request takes "
                                "audio_features and, optionally, visual_frames", req.id)
        if "audio_features" not in req.buffers:
            raise ProtocolError(P.BAD_PAYLOAD, "buffer audio_features is required", req.id)
        for b in req.buffers.values():
            if b.dtype != "float32":
                raise ProtocolError(P.BAD_PAYLOAD, f"buffer {b.name}: dtype must be float32, got {b.dtype}", req.id)
        if self.conns.blocked(req.envelope[0]):
            raise ProtocolError(P.BUSY, "this connection has more than server.client_queue_bytes of replies it has "
                                "not read yet; read them first", req.id)
        job = Job(req, name, batch, start, wrap, time.monotonic(),
                  nbytes=sum(b.nbytes for b in req.buffers.values()))
        # its tensors count against capacity.max_pending_bytes from now on, while its avatar loads too
        limit = self.cfg.capacity.max_pending_bytes
        if self.scheduler.pending_bytes + self.loading_bytes + job.nbytes > limit and (
                self.scheduler.pending or self.loading_bytes):
            raise ProtocolError(P.BUSY, f"queued requests hold {self.scheduler.pending_bytes + self.loading_bytes} "
                                f"bytes (capacity.max_pending_bytes = {limit})", req.id)
        self.loading_bytes += job.nbytes

        def ready(e: AvatarEntry) -> None:
            self.loading_bytes -= job.nbytes
            self._guard(job, self._avatar_ready, e)
        try:
            self._acquire(name, ready)
        except ProtocolError:
            self.loading_bytes -= job.nbytes
            raise

    @request_scope
    def _guard(self, job: Job, fn, *args) -> None:
        try:
            fn(job, *args)
        except ProtocolError as e:
            self._fail(job, e.code, e.message)
        except Exception as e:  # noqa: BLE001
            log.exception("request failed")
            self._fail(job, P.INTERNAL, f"internal error: {e}")

    def _avatar_ready(self, job: Job, e: AvatarEntry) -> None:
        self._require_loaded(e)
        req, g, b = job.req, e.graph, job.batch
        expect = {"audio_features": (b, *g.audio_shape), "visual_frames": (b, *g.image_shape)}
        for name, buf in req.buffers.items():
            if buf.shape != expect[name]:
                raise ProtocolError(P.BAD_PAYLOAD, f"buffer {name}: expected float32 {list(expect[name])} for "
                                    f"batch_size {b} and avatar {e.name}, got {list(buf.shape)}")
        if not self.gpus:
            raise ProtocolError(P.INTERNAL, "the engine has no GPU worker")
        too_big = ring_room_error(g, self.cfg.ring.max_face)
        if too_big:
            raise ProtocolError(P.MODEL_ERROR, f"avatar {e.name}: {too_big}")
        if self.conns.get(req.envelope[0]) is None:
            return                                   # the client left while its avatar loaded
        job.entry = e                                # (the scheduler's choice of worker needs it)
        job.indices = np.asarray(frame_index(np.arange(job.start, job.start + b, dtype=np.int64), e.view.n,
                                             job.wrap or e.model.wrap), np.int64)
        job.idle = [False] * b
        try:
            self.scheduler.enqueue(job, time.monotonic(), startable=self._startable())
        except QueueFull as err:
            job.entry = None                         # not counted on the avatar: nothing to give back
            raise ProtocolError(P.BUSY, str(err)) from None
        e.inflight += 1
        e.last_used = time.time()

    # -- jobs --------------------------------------------------------------------------------------
    def _start(self, job: Job, g: GpuHandle, slot: int) -> None:
        e, g_info, b = job.entry, job.entry.graph, job.batch
        seq = next(self.seq) & 0xFFFFFFFF
        ring = g.ring
        ring.set_state(slot, SlotState.FILLED, seq, b)
        job.gpu, job.slot, job.seq = g, slot, seq
        job.t_start = time.monotonic()
        g.jobs[slot] = job
        fill = {"avatar": e.segment, "indices": job.indices.tolist()}
        extra: dict[str, Any] = {}
        if job.streams is not None:
            wins = [sb.windows for sb in job.streams]
            nwin = sum(sb.nwin for sb in job.streams)
            if nwin and not all(job.idle):
                np.copyto(ring.audio(slot, (nwin, 1, 80, 16)), np.concatenate(wins))
            extra["stream"] = {"encoder": job.streams[0].stream.encoder, "idle": all(job.idle),
                               "segments": [{"count": sb.count, "pad_before": sb.pad_before, "nwin": sb.nwin}
                                            for sb in job.streams]}
            for sb in job.streams:
                sb.windows = None                # in the ring now
        else:
            np.copyto(ring.audio(slot, (b, *g_info.audio_shape)), job.req.buffers["audio_features"].array())
            if "visual_frames" in job.req.buffers:
                np.copyto(ring.visual(slot, (b, *g_info.image_shape)), job.req.buffers["visual_frames"].array())
                fill = None
            job.req.buffers.clear()                # the ZeroMQ frames can go now
        ring.set_state(slot, SlotState.QUEUED)
        send_msg(self.backend, {"t": "run", "slot": slot, "seq": seq, "model": e.name, "onnx": str(e.files.onnx),
                                "batch": b, "fill": fill, **extra}, to=g.identity)

    def _free(self, g: GpuHandle, slot: int) -> None:
        g.ring.set_state(slot, SlotState.FREE)
        g.jobs.pop(slot, None)
        if slot not in g.free:
            g.free.append(slot)

    def _fail(self, job: Job, code: str, message: str) -> None:
        """Error reply for a job; its slot (if any) is freed once no compositor holds part of it."""
        if not job.done:
            job.done = True
            if job.streams is not None:
                for b in job.streams:
                    b.stream.inflight -= 1
                    if not b.stream.closed:
                        self._close_stream(b.stream, (code, f"frames {b.first}..{b.first + b.count - 1}: {message}"))
            else:
                self.reply_error(job.req, code, message)
            self._account(job)
        if job.gpu is not None and job.chunks_left == 0 and job.gpu.jobs.get(job.slot) is job:
            self._free(job.gpu, job.slot)
        else:
            self.scheduler.cancel(job)

    def _account(self, job: Job, ok: bool = False) -> None:
        e = job.entry
        if e is None:
            return
        e.inflight -= 1
        if ok:
            e.requests += 1
            e.total_ms += 1000 * (time.monotonic() - job.t_recv)

    def _expire(self, now: float) -> None:
        limit = self.cfg.supervision.request_timeout_s
        for job in self.scheduler.expire(now, limit):
            self._fail(job, P.BUSY, f"no GPU worker could take the batch within {limit:.0f} s "
                                    "(supervision.request_timeout_s)")
        idle = self.cfg.streams.idle_timeout_s
        for s in list(self.scheduler.streams.values()):
            if (s.total is None and now - s.last_audio > idle and not s.inflight and not s.ready
                    and s.schedulable() == 0):
                self._close_stream(s, (P.STREAM_TIMEOUT, f"no audio for {idle:.0f} s (streams.idle_timeout_s)"))

    # -- backend side ------------------------------------------------------------------------------
    def on_backend(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        msg = json.loads(frames[1].bytes)
        t = msg.get("t")
        if ident == SUP:
            if t == "died":
                self.on_died(msg)
            elif t == "status?":
                self._send_state()
            return
        kind, idx = chr(ident[0]), int(ident[1:])
        if kind == "g":
            self.on_gpu(self.gpus[idx], msg)
        elif kind == "c":
            self.on_comp(self.comps[idx], msg, frames[2:])

    def _send_state(self) -> None:
        send_msg(self.backend, {"t": "front_state", "accepting": self.accepting, "pid": os.getpid(), **self.health()},
                 to=SUP)

    def on_gpu(self, g: GpuHandle, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "ready":
            g.state, g.provider, g.models = "ready", msg["provider"], set(msg.get("models", []))
            g.loading, g.stats = set(msg.get("loading", [])), msg.get("stats", {})
            log.info("GPU worker %d ready (%s, device %s)", g.idx, g.provider, msg.get("device"))
            self._send_state()
            return
        if t == "models":
            g.models = set(msg["models"])
            g.loading, g.stats = set(msg.get("loading", [])), msg.get("stats", g.stats)    # issue 7
            for name, message in msg.get("failed", {}).items():
                if any(name in x.models or name in x.loading for x in self.gpus if x.state == "ready"):
                    log.warning("GPU worker %d could not load %s (%s); others serve it", g.idx, name, message)
                    continue
                why = f"avatar {name}'s network could not be loaded: {message}"
                for job in [j for j in self.scheduler.pending if j.model == name]:
                    self.scheduler.cancel(job)
                    self._fail(job, P.MODEL_ERROR, why)
                for s in [s for s in self.scheduler.streams.values() if s.model == name and not s.inflight]:
                    self._close_stream(s, (P.MODEL_ERROR, why))
            return
        job = g.jobs.get(msg.get("slot", -1))
        if job is None or job.seq != msg.get("seq"):
            return
        if t == "failed":
            self._fail(job, msg["code"], msg["message"])
        elif t == "inferred":
            if job.inferred:
                return                                  # told twice (the worker, then its death): once is enough
            g.models = set(msg.get("models", []))
            g.stats = msg.get("stats", g.stats)
            g.batches += 1
            g.frames += job.batch
            job.infer_ms, job.prep_ms = msg["ms"], msg.get("prep_ms", 0.0)
            job.inferred = True
            if job.done:
                self._free(g, job.slot)
            elif job.req is not None and job.req.method == "infer":
                self._send_infer(job)
            else:
                self._dispatch(job)

    def on_comp(self, c: CompHandle, msg: dict[str, Any], blobs: list[zmq.Frame]) -> None:
        t = msg["t"]
        if t == "ready":
            c.state = "ready"
            log.info("compositor %d ready", c.idx)
            self._send_state()
            while self.comp_waiting:
                self._dispatch(self.comp_waiting.popleft())
            return
        key = (msg["ring"], msg["slot"], msg["seq"], msg["start"])
        entry = c.outstanding.pop(key, None)
        if entry is None:
            return
        job, chunk = entry
        job.chunks_left -= 1
        if t == "pasted":
            c.frames += len(msg["sizes"])
            job.sizes[chunk["start"]:chunk["start"] + len(msg["sizes"])] = msg["sizes"]
            for i, blob in zip(msg["inline"], blobs):
                job.inline[i] = bytes(blob.buffer)          # rare (a JPEG larger than its ring area)
        elif job.error is None:
            job.error = (P.INTERNAL, msg.get("message", "compositing failed"))
        if job.chunks_left == 0:
            if job.error is not None or job.done:
                self._fail(job, *(job.error or (P.INTERNAL, "")))
            elif job.streams is not None:
                self._finish_stream_job(job)
            else:
                self._send_composite(job)

    def _dispatch(self, job: Job) -> None:
        """Split an inferred batch into chunks for the compositors, least loaded first."""
        ready = [c for c in self.comps if c.state == "ready"]
        if not ready:
            self.comp_waiting.append(job)
            return
        g, e = job.gpu, job.entry
        g.ring.set_state(job.slot, SlotState.COMPOSITING)
        job.t_comp = time.monotonic()
        job.sizes = [0] * job.batch
        n = min(job.batch, 2 * len(ready))
        bounds = np.linspace(0, job.batch, n + 1).astype(int)
        out = self.cfg.output
        for s, t in zip(bounds[:-1], bounds[1:]):
            chunk = {"t": "paste", "ring": g.ring.name, "slot": job.slot, "seq": job.seq, "start": int(s),
                     "count": int(t - s), "avatar": e.segment, "indices": job.indices[s:t].tolist(),
                     "face": list(e.graph.output_shape), "mode": e.model.paste, "quality": out.jpeg_quality,
                     "subsampling": out.chroma_subsampling, "idle": job.idle[s:t]}
            self._send_chunk(job, chunk, min(ready, key=lambda c: (c.load, c.idx)))

    def _send_chunk(self, job: Job, chunk: dict[str, Any], c: CompHandle) -> None:
        c.outstanding[(chunk["ring"], chunk["slot"], chunk["seq"], chunk["start"])] = (job, chunk)
        job.chunks_left += 1
        send_msg(self.backend, chunk, to=c.identity)

    def _jpegs(self, job: Job) -> list[bytes]:
        """The batch's JPEGs, copied out of the ring slot."""
        g = job.gpu
        g.ring.set_state(job.slot, SlotState.SENDING)
        return [job.inline[i] if i in job.inline else bytes(g.ring.jpeg_area(job.slot, i)[:job.sizes[i]])
                for i in range(job.batch)]

    def _timing(self, job: Job) -> dict[str, Any]:
        g = job.gpu
        return {"model": job.model, "batch_size": job.batch, "start_frame": job.start,
                "frame_indices": job.indices.tolist(),
                "inference_time_ms": round(job.infer_ms, 3), "prep_time_ms": round(job.prep_ms, 3),
                "total_time_ms": round(1000 * (time.monotonic() - job.t_recv), 3),
                "gpu_id": -1 if g.device is None else g.device, "worker": g.idx, "provider": g.provider,
                "success": True}

    def _send_infer(self, job: Job) -> None:
        g, shape = job.gpu, (job.batch, *job.entry.graph.output_shape)
        g.ring.set_state(job.slot, SlotState.SENDING)
        out = bytes(memoryview(g.ring.output(job.slot, shape)).cast("B"))
        self._reply_job(job, P.ok_reply(job.req.id, self._timing(job),
                                        [{"name": "output", "dtype": "float32", "shape": list(shape)}]), [out])

    def _send_composite(self, job: Job) -> None:
        v = job.entry.view
        frames = self._jpegs(job)
        result = self._timing(job)
        result.update(composite_time_ms=round(1000 * (time.monotonic() - job.t_comp), 3),
                      width=v.width, height=v.height, jpeg_bytes=int(sum(job.sizes)))
        self._reply_job(job, P.ok_reply(job.req.id, result, [{"name": "frames", "dtype": "jpeg", "count": job.batch}]),
                        frames)
        self.batches += 1
        self.frames_out += job.batch

    def _reply_job(self, job: Job, header: bytes, body: list[bytes]) -> None:
        """The reply of a finished batch; its slot is free as soon as the bytes are copied out."""
        job.done = True
        self._account(job, ok=True)
        self.metrics.batch_done(job)
        self._free(job.gpu, job.slot)
        self._answer(job.req, job.req.envelope, header, body)

    # -- supervision -------------------------------------------------------------------------------
    def on_died(self, msg: dict[str, Any]) -> None:
        role, idx = msg["role"], msg["idx"]
        if role == "gpu":
            g = self.gpus[idx]
            g.state, g.restarts, g.models = "restarting", msg.get("restarts", g.restarts + 1), set()
            g.loading, g.stats = set(), {}
            for slot, job in list(g.jobs.items()):
                state = g.ring.state(slot)
                if state in (SlotState.FILLED, SlotState.QUEUED, SlotState.RUNNING):
                    self._fail(job, P.WORKER_DIED, f"GPU worker {idx} died while running this batch; "
                               "it is being replaced, retry the request")
                elif state == SlotState.INFERRED:       # it died after the Run, before telling us
                    self.on_gpu(g, {"t": "inferred", "slot": slot, "seq": job.seq, "ms": 0.0})
        elif role == "compositor":
            c = self.comps[idx]
            c.state, c.restarts = "restarting", msg.get("restarts", c.restarts + 1)
            lost, c.outstanding = list(c.outstanding.values()), {}
            ready = [x for x in self.comps if x.state == "ready"]
            for job, chunk in lost:
                job.chunks_left -= 1
                if ready:
                    self._send_chunk(job, chunk, min(ready, key=lambda x: (x.load, x.idx)))
                else:
                    job.error = job.error or (P.WORKER_DIED, f"compositor {idx} died and no other is ready")
                    if job.chunks_left == 0:
                        self._fail(job, *job.error)
        self._send_state()

    def shutdown(self) -> None:
        if not hasattr(self, "ctx"):
            return
        for e in list(self.store.entries.values()):   # requests waiting for an avatar still loading
            waiters, e.waiters = e.waiters, []
            for w in waiters:
                try:
                    w(e)                               # _require_loaded answers shutting_down
                except Exception:  # noqa: BLE001
                    log.exception("a waiting request failed at shutdown")
        for s in list(self.scheduler.streams.values()):
            self._close_stream(s, (P.SHUTTING_DOWN, "the engine is stopping"))
        jobs = [*self.scheduler.pending, *self.comp_waiting, *(j for g in self.gpus for j in g.jobs.values())]
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
