"""The front: the client ROUTER socket, request scheduling and reply assembly.

One thread owns every socket (ZeroMQ sockets are not thread-safe); the avatar loader thread only
wakes it through a pipe. A composite request goes::

    client --ROUTER--> front: parse, validate, pick a GPU worker with a free ring slot,
                       copy the request tensors from the ZeroMQ frames into the slot (the one copy)
    front --"run"--> GPU worker: (cut the visual input from the avatar), one Run, output into the slot
    GPU worker --"inferred"--> front --"paste" x chunks--> compositors (least loaded first)
    compositors: paste + JPEG, JPEG bytes into the slot --"pasted"--> front
    front --ROUTER--> client: header + JPEG frames sent zero-copy from the slot; the slot is freed
                       when ZeroMQ has released them (MessageTracker)

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

from . import __version__
from . import protocol as P
from .avatar import AvatarError, UnknownAvatar
from .avatar_store import AvatarEntry, AvatarStore, CapacityError
from .config import WRAP_MODES
from .kernels import frame_index
from .process import Role, send_msg
from .protocol import ProtocolError
from .ring import BatchRing, SlotState
from .front_streams import StreamMethods
from .jobs import CompHandle, GpuHandle, Job
from .streams import Stream

log = logging.getLogger(__name__)
SUP = b"sup"


class Front(StreamMethods, Role):
    role = "front"

    def __init__(self, cfg, idx: int, hb_slot: int, gpus: list[tuple[int | None, str]], compositors: int) -> None:
        super().__init__(cfg, idx, hb_slot)
        self.gpu_specs = gpus                # (device, ring name) per GPU worker
        self.n_comps = compositors

    # -- start-up ----------------------------------------------------------------------------------
    def init_process(self) -> None:
        self.ctx = zmq.Context()
        self.backend = self.ctx.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.setsockopt(zmq.SNDHWM, 0)
        self.backend.setsockopt(zmq.RCVHWM, 0)
        self.backend.bind(self.cfg.backend_endpoint)
        self.client = self.ctx.socket(zmq.ROUTER)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.setsockopt(zmq.SNDHWM, 100_000)
        self.client.setsockopt(zmq.RCVHWM, 100_000)
        self.client.setsockopt(zmq.ROUTER_MANDATORY, 1)     # a send to a gone client fails: streams notice
        self.gpus = [GpuHandle(i, dev, BatchRing.attach(name)) for i, (dev, name) in enumerate(self.gpu_specs)]
        for g in self.gpus:
            g.free = list(range(g.ring.geometry.nslots))
            for s in g.free:
                g.ring.set_state(s, SlotState.FREE)
        self.by_ring = {g.ring.name: g for g in self.gpus}
        self.comps = [CompHandle(i) for i in range(self.n_comps)]
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.woken: deque[AvatarEntry] = deque()
        self.store = AvatarStore(self.cfg, self._wake, self._evicted)
        self.pending: deque[Job] = deque()
        self.comp_waiting: deque[Job] = deque()
        self.sending: list[tuple[zmq.MessageTracker, GpuHandle, int, int]] = []
        self.seq = itertools.count(int(time.time()) & 0xFFFF)
        self.accepting = False
        self.started = time.time()
        self.batches = 0
        self.frames_out = 0
        self.streams: dict[str, Stream] = {}
        for name, mc in self.cfg.models.items():
            if mc.preload:
                try:
                    self.store.acquire(name, lambda e: None)
                except (AvatarError, CapacityError) as e:
                    log.error("preload of avatar %s failed: %s", name, e)

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
        self.poller.register(self.wake_r, zmq.POLLIN)
        last_check = time.monotonic()
        while not self.stopping:
            self.beat()
            events = dict(self.poller.poll(self._poll_timeout()))
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
            if self.sending:
                self._reap_sent()
            if self.streams:
                self._deliver_streams()
            if not self.accepting and self._all_ready():
                self.client.bind(self.cfg.server.front)
                self.poller.register(self.client, zmq.POLLIN)
                self.accepting = True
                log.info("accepting requests on %s", self.cfg.server.front)
                self._send_state()
            now = time.monotonic()
            if now - last_check > 1.0:
                last_check = now
                self._expire(now)

    def _poll_timeout(self) -> int:
        timeout = 2 if self.sending else 250
        now = time.monotonic()
        for s in self.streams.values():
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

    # -- client side -------------------------------------------------------------------------------
    def on_client(self, frames: list[zmq.Frame]) -> None:
        try:
            envelope, body = P.split_envelope(frames)
        except ProtocolError:
            return
        envelope = [f.bytes for f in envelope]     # identities are tiny; tracked sends need plain bytes
        req_id = None
        try:
            req = P.parse_request(envelope, body)
            req_id = req.id
            getattr(self, f"do_{req.method}")(req)
        except ProtocolError as e:
            self.reply_error(envelope, e.req_id if e.req_id is not None else req_id, e.code, e.message)
        except Exception as e:  # noqa: BLE001 - never let one request take the front down
            log.exception("request failed")
            self.reply_error(envelope, req_id, P.INTERNAL, f"internal error: {e}")

    def _send_client(self, parts: list[Any]) -> bool:
        """Send to a client; False when the client is gone or not reading (its streams close)."""
        try:
            self.client.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            self._client_gone(parts[0])
            return False

    def reply_error(self, envelope: list[Any], req_id: Any, code: str, message: str) -> None:
        self._send_client([*envelope, P.error_reply(req_id, code, message)])

    def reply_ok(self, req: P.Request, result: dict[str, Any]) -> None:
        self._send_client([*req.envelope, P.ok_reply(req.id, result)])

    def do_health(self, req: P.Request) -> None:
        self.reply_ok(req, self.health())

    def health(self) -> dict[str, Any]:
        ready = [g for g in self.gpus if g.state == "ready"]
        return {
            "healthy": self.accepting and bool(ready) and any(c.state == "ready" for c in self.comps),
            "inference_healthy": bool(ready),
            "loaded_models": len(self.store.loaded()),
            "max_models": self.cfg.capacity.models_per_device * max(1, len(self.gpus)),
            "version": __version__, "protocol": P.VERSION,
            "provider": sorted({g.provider for g in self.gpus if g.provider}),
            "uptime_s": round(time.time() - self.started, 1),
            "pending": len(self.pending),
            "batches": self.batches, "frames": self.frames_out,
            "background_bytes": {"used": self.store.used_bytes(), "budget": self.cfg.capacity.background_bytes},
            "gpu_workers": [{"idx": g.idx, "gpu_id": -1 if g.device is None else g.device, "provider": g.provider,
                             "state": g.state, "restarts": g.restarts, "inflight": len(g.jobs),
                             "free_slots": len(g.free), "models": sorted(g.models), "batches": g.batches,
                             "frames": g.frames} for g in self.gpus],
            "compositors": [{"idx": c.idx, "state": c.state, "restarts": c.restarts,
                             "outstanding_frames": c.load, "frames": c.frames} for c in self.comps],
            "streams": [s.describe(time.monotonic()) for s in self.streams.values()],
        }

    def do_models(self, req: P.Request) -> None:
        self.reply_ok(req, {"models": self.store.describe()})

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
            if e.state != "loaded":
                raise ProtocolError(P.MODEL_ERROR, e.error)
            g = self._pick_gpu(e, any_state=True)
            if g is not None:
                send_msg(self.backend, {"t": "load", "model": name, "onnx": str(e.files.onnx)}, to=g.identity)
            self.reply_ok(req, e.describe())
        self._acquire(name, lambda e: self._guard_request(req, loaded, e))

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
        start = P.check_int(p, "start_frame", 0, None, default=0, req_id=req.id)
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
        job = Job(req, name, batch, start, wrap, time.monotonic())
        self._acquire(name, lambda e: self._guard(job, self._avatar_ready, e))

    def _guard(self, job: Job, fn, *args) -> None:
        try:
            fn(job, *args)
        except ProtocolError as e:
            self._fail(job, e.code, e.message)
        except Exception as e:  # noqa: BLE001
            log.exception("request failed")
            self._fail(job, P.INTERNAL, f"internal error: {e}")

    def _avatar_ready(self, job: Job, e: AvatarEntry) -> None:
        req, g, b = job.req, e.graph, job.batch
        if e.state != "loaded":
            raise ProtocolError(P.MODEL_ERROR, f"avatar {e.name} could not be loaded: {e.error}")
        expect = {"audio_features": (b, *g.audio_shape), "visual_frames": (b, *g.image_shape)}
        for name, buf in req.buffers.items():
            if buf.shape != expect[name]:
                raise ProtocolError(P.BAD_PAYLOAD, f"buffer {name}: expected float32 {list(expect[name])} for "
                                    f"batch_size {b} and avatar {e.name}, got {list(buf.shape)}")
        geo = self.gpus[0].ring.geometry if self.gpus else None
        if geo is None:
            raise ProtocolError(P.INTERNAL, "the engine has no GPU worker")
        if (int(np.prod(g.image_shape)) * 4 > geo.visual_bytes or int(np.prod(g.audio_shape)) * 4 > geo.audio_bytes
                or int(np.prod(g.output_shape)) * 4 > geo.output_bytes):
            raise ProtocolError(P.MODEL_ERROR, f"avatar {e.name}'s network tensors {g.image_shape}/{g.audio_shape} "
                                f"exceed the ring's room (raise ring.max_face)")
        job.entry = e
        job.indices = np.asarray(frame_index(np.arange(job.start, job.start + b), e.view.n,
                                             job.wrap or e.model.wrap), np.int64)
        e.inflight += 1
        e.last_used = time.time()
        self._submit(job)

    # -- scheduling --------------------------------------------------------------------------------
    def _pick_gpu(self, e: AvatarEntry, any_state: bool = False) -> GpuHandle | None:
        cands = [g for g in self.gpus if (any_state or g.free) and g.state == "ready"]
        if not cands:
            return None
        pref = e.model.preferred_gpu
        return min(cands, key=lambda g: (e.name not in g.models, pref is not None and g.device != pref,
                                         len(g.jobs), g.idx))

    def _submit(self, job: Job) -> None:
        g = self._pick_gpu(job.entry)
        if g is None:
            if len(self.pending) >= self.cfg.capacity.max_pending:
                raise ProtocolError(P.BUSY, f"every ring slot is in use and {len(self.pending)} requests are queued")
            self.pending.append(job)
            return
        self._start(job, g, g.free.pop(0))

    def _start(self, job: Job, g: GpuHandle, slot: int) -> None:
        e, g_info, b = job.entry, job.entry.graph, job.batch
        seq = next(self.seq) & 0xFFFFFFFF
        ring = g.ring
        ring.set_state(slot, SlotState.FILLED, seq, b)
        job.gpu, job.slot, job.seq = g, slot, seq
        g.jobs[slot] = job
        fill = {"avatar": e.segment, "indices": job.indices.tolist()}
        extra: dict[str, Any] = {}
        if job.streams is not None:
            wins = [sb.windows for sb in job.streams]
            nwin = sum(len(w) for w in wins)
            if nwin and not job.idle:
                np.copyto(ring.audio(slot, (nwin, 1, 80, 16)), np.concatenate(wins))
            extra["stream"] = {"encoder": job.streams[0].stream.encoder, "idle": job.idle,
                               "segments": [{"count": sb.count, "pad_before": sb.pad_before, "nwin": len(sb.windows)}
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

    def _drain_pending(self) -> None:
        while self.pending:
            job = self.pending[0]
            g = self._pick_gpu(job.entry)
            if g is None:
                return
            self.pending.popleft()
            self._guard(job, lambda j: self._start(j, g, g.free.pop(0)))

    def _free(self, g: GpuHandle, slot: int) -> None:
        g.ring.set_state(slot, SlotState.FREE)
        g.jobs.pop(slot, None)
        if slot not in g.free:
            g.free.append(slot)
        self._drain_pending()
        if self.streams:
            self._schedule_streams()

    def _fail(self, job: Job, code: str, message: str) -> None:
        """Error reply for a job; its slot (if any) is freed by the caller's state logic."""
        if not job.done:
            job.done = True
            if job.streams is not None:
                for b in job.streams:
                    b.stream.inflight -= 1
                    if not b.stream.closed:
                        self._close_stream(b.stream, (code, f"frames {b.first}..{b.first + b.count - 1}: {message}"))
            else:
                self.reply_error(job.req.envelope, job.req.id, code, message)
            self._account(job)
        if job.gpu is not None and job.chunks_left == 0 and job.gpu.jobs.get(job.slot) is job:
            self._free(job.gpu, job.slot)
        elif job in self.pending:
            self.pending.remove(job)

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
        for job in [j for j in self.pending if now - j.t_recv > limit]:
            self._fail(job, P.BUSY, f"no GPU worker could take the batch within {limit:.0f} s")
        idle = self.cfg.streams.idle_timeout_s
        for s in list(self.streams.values()):
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
        send_msg(self.backend, {"t": "front_state", "accepting": self.accepting, **self.health()}, to=SUP)

    def on_gpu(self, g: GpuHandle, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "ready":
            g.state, g.provider, g.models = "ready", msg["provider"], set(msg.get("models", []))
            log.info("GPU worker %d ready (%s, device %s)", g.idx, g.provider, msg.get("device"))
            self._send_state()
            self._drain_pending()
            self._schedule_streams()
            return
        if t == "models":
            g.models = set(msg["models"])
            return
        job = g.jobs.get(msg.get("slot", -1))
        if job is None or job.seq != msg.get("seq"):
            return
        if t == "failed":
            self._fail(job, msg["code"], msg["message"])
        elif t == "inferred":
            g.models = set(msg.get("models", []))
            g.batches += 1
            g.frames += job.batch
            job.infer_ms, job.prep_ms = msg["ms"], msg.get("prep_ms", 0.0)
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
                     "subsampling": out.chroma_subsampling, "idle": job.idle}
            self._send_chunk(job, chunk, min(ready, key=lambda c: (c.load, c.idx)))

    def _send_chunk(self, job: Job, chunk: dict[str, Any], c: CompHandle) -> None:
        c.outstanding[(chunk["ring"], chunk["slot"], chunk["seq"], chunk["start"])] = (job, chunk)
        job.chunks_left += 1
        send_msg(self.backend, chunk, to=c.identity)

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
        out = g.ring.output(job.slot, shape)
        header = P.ok_reply(job.req.id, self._timing(job),
                            [{"name": "output", "dtype": "float32", "shape": list(shape)}])
        self._send_tracked(job, [*job.req.envelope, header], [memoryview(out).cast("B")])

    def _send_composite(self, job: Job) -> None:
        g, v = job.gpu, job.entry.view
        frames = [job.inline[i] if i in job.inline else g.ring.jpeg_area(job.slot, i)[:job.sizes[i]]
                  for i in range(job.batch)]
        result = self._timing(job)
        result.update(composite_time_ms=round(1000 * (time.monotonic() - job.t_comp), 3),
                      width=v.width, height=v.height,
                      jpeg_bytes=int(sum(job.sizes)))
        header = P.ok_reply(job.req.id, result, [{"name": "frames", "dtype": "jpeg", "count": job.batch}])
        self._send_tracked(job, [*job.req.envelope, header], frames)
        self.batches += 1
        self.frames_out += job.batch

    def _send_tracked(self, job: Job, head: list[Any], body: list[Any]) -> None:
        """Send a reply whose ``body`` parts may point into the job's ring slot, without copying
        them; the slot is freed only when ZeroMQ has released every one of those parts."""
        frames = [zmq.Frame(p, copy=False, track=True) if isinstance(p, memoryview) else p for p in body]
        job.done = True
        self._account(job, ok=True)
        try:
            sent = self._send_client([*head, *frames])
        except Exception:  # noqa: BLE001 - the slot must come back whatever happened
            log.exception("reply failed")
            sent = False
        tracked = [f for f in frames if isinstance(f, zmq.Frame) and f.tracker is not None]
        if not sent or not tracked:              # the client is gone, or nothing points into the slot
            self._free(job.gpu, job.slot)
            return
        job.gpu.ring.set_state(job.slot, SlotState.SENDING)
        self.sending.append((zmq.MessageTracker(*tracked), job.gpu, job.slot, job.seq))

    def _reap_sent(self) -> None:
        still = []
        for tracker, g, slot, seq in self.sending:
            if tracker.done:
                if g.ring.check(slot, seq, SlotState.SENDING):
                    self._free(g, slot)
            else:
                still.append((tracker, g, slot, seq))
        self.sending = still

    # -- supervision -------------------------------------------------------------------------------
    def on_died(self, msg: dict[str, Any]) -> None:
        role, idx = msg["role"], msg["idx"]
        if role == "gpu":
            g = self.gpus[idx]
            g.state, g.restarts, g.models = "restarting", msg.get("restarts", g.restarts + 1), set()
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
        for s in list(self.streams.values()):
            self._close_stream(s, (P.SHUTTING_DOWN, "the engine is stopping"))
        for job in [*self.pending, *self.comp_waiting, *(j for g in self.gpus for j in g.jobs.values())]:
            if not job.done and job.req is not None:
                job.done = True
                self.reply_error(job.req.envelope, job.req.id, P.SHUTTING_DOWN, "the engine is stopping")
        self.client.setsockopt(zmq.LINGER, 1000)      # let those replies leave
        self.client.close()
        self.store.close()
        self.sending.clear()
        for g in self.gpus:
            g.ring.close()
        self.ctx.destroy(linger=0)
