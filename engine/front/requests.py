"""The front's request handling for batches and avatars: ``composite``, ``infer``, ``health``,
``models``, ``load``, ``unload``. Each method validates its request (errors are ``ProtocolError``
with the code docs/protocol.md gives), waits for the avatar when it must, and either answers at once
or hands a job to the scheduler; the :class:`~engine.front.pipeline.Pipeline` takes it from there.
Stream methods are in :mod:`engine.front.stream_methods`."""
from __future__ import annotations

import logging
import time

import numpy as np

from engine import protocol as P
from engine.avatars.disk import AvatarError, UnknownAvatar, ring_room_error
from engine.avatars.store import AvatarEntry, CapacityError
from engine.front.jobs import GpuHandle, Job
from engine.front.part import FrontPart
from engine.front.scheduler import QueueFull
from engine.kernels.image import frame_index
from engine.protocol import ProtocolError
from engine.runtime.config import WRAP_MODES
from engine.runtime.logs import request_scope

log = logging.getLogger("engine.front")


class Requests(FrontPart):
    """Batch and avatar methods (``do_<method>``), and what the stream methods share with them:
    waiting for an avatar (:meth:`acquire`, :meth:`require_loaded`) and answering errors raised
    after the request has waited (:meth:`guard_request`)."""

    def __init__(self, front) -> None:
        super().__init__(front)
        self.loading_bytes = 0                       # tensors of batch requests waiting for their avatar

    # -- shared by every method that waits for an avatar ---------------------------------------------
    def require_loaded(self, e: AvatarEntry) -> None:
        """A waiter's check: the avatar is in memory, or the reason it is not, with its code."""
        if self.front.stopping:
            raise ProtocolError(P.SHUTTING_DOWN, "the engine is stopping")
        if e.state != "loaded":
            raise ProtocolError(P.CAPACITY if e.capacity_error else P.MODEL_ERROR,
                                f"avatar {e.name} could not be loaded: {e.error}")

    def acquire(self, name: str, waiter) -> None:
        """Call ``waiter(entry)`` once avatar ``name`` is in memory (at once when it is)."""
        try:
            self.front.store.acquire(name, waiter)
        except UnknownAvatar as e:
            raise ProtocolError(P.UNKNOWN_MODEL, str(e)) from None
        except AvatarError as e:
            raise ProtocolError(P.MODEL_ERROR, str(e)) from None
        except CapacityError as e:
            raise ProtocolError(P.CAPACITY, str(e)) from None

    @request_scope
    def guard_request(self, req: P.Request, fn, *args) -> None:
        """Run a step of ``req`` after it waited (for its avatar): its errors become its reply."""
        try:
            fn(*args)
        except ProtocolError as e:
            self.front.reply_error(req, e.code, e.message)
        except Exception as e:  # noqa: BLE001
            log.exception("request failed")
            self.front.reply_error(req, P.INTERNAL, f"internal error: {e}")

    # -- health, models, load, unload ----------------------------------------------------------------
    def do_health(self, req: P.Request) -> None:
        self.front.reply_ok(req, self.front.health())

    def describe(self, m: dict) -> dict:
        """An avatar's object as ``models`` and ``load`` give it (docs/protocol.md 7.4, 7.5): the
        store's description, its precision and each worker's report on its network (path, fp16 error)."""
        m["precision"] = self.cfg.precision(m["name"])
        m["networks"] = [{"worker": g.idx, **g.stats["networks"][m["name"]]} for g in self.front.gpus
                         if m["name"] in g.stats.get("networks", {})]
        return m

    def workers(self) -> list[dict]:
        """Per GPU worker, what it keeps resident as ``models`` gives it (docs/protocol.md 7.4): the
        ``resident`` and ``architectures`` of its own report, as in ``health.gpu_workers[]``."""
        return [{"idx": g.idx, "gpu_id": -1 if g.device is None else g.device,
                 **{k: g.stats[k] for k in ("resident", "architectures") if k in g.stats}} for g in self.front.gpus]

    def do_models(self, req: P.Request) -> None:
        self.front.reply_ok(req, {"models": [self.describe(m) for m in self.front.store.describe()],
                                  "gpu_workers": self.workers()})

    def do_load(self, req: P.Request) -> None:
        name = P.check_str(req.params, "model", req_id=req.id)

        def loaded(e: AvatarEntry) -> None:
            self.require_loaded(e)
            g = self._pick_gpu(e)
            if g is not None:
                self.front.to_backend(g.identity, {"t": "load", "model": name, "onnx": str(e.files.onnx)})
                if name not in g.models:
                    g.loading.add(name)
            self.front.reply_ok(req, self.describe(e.describe()))
        self.acquire(name, lambda e: self.guard_request(req, loaded, e))

    def _pick_gpu(self, e: AvatarEntry) -> GpuHandle | None:
        """The GPU worker to load an avatar's network on ahead of its requests."""
        cands = [g for g in self.front.gpus if g.state == "ready"]
        pref = e.model.preferred_gpu
        return min(cands, key=lambda g: (e.name not in g.models, pref is not None and g.device != pref,
                                         len(g.jobs), g.idx), default=None)

    def do_unload(self, req: P.Request) -> None:
        name = P.check_str(req.params, "model", req_id=req.id)
        store = self.front.store
        if name not in store.names():
            raise ProtocolError(P.UNKNOWN_MODEL, f"unknown avatar {name!r}", req.id)
        try:
            unloaded = store.unload(name)
        except CapacityError as e:
            raise ProtocolError(P.BUSY, str(e), req.id) from None
        for g in self.front.gpus:
            self.front.to_backend(g.identity, {"t": "unload", "model": name})
        self.front.reply_ok(req, {"model": name, "unloaded": unloaded})

    # -- composite, infer ----------------------------------------------------------------------------
    def do_composite(self, req: P.Request) -> None:
        self._batch_request(req)

    def do_infer(self, req: P.Request) -> None:
        self._batch_request(req)

    def _batch_request(self, req: P.Request) -> None:
        f, p = self.front, req.params
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
        if f.conns.blocked(req.envelope[0]):
            raise ProtocolError(P.BUSY, "this connection has more than server.client_queue_bytes of replies it has "
                                "not read yet; read them first", req.id)
        job = Job(req, name, batch, start, wrap, time.monotonic(),
                  nbytes=sum(b.nbytes for b in req.buffers.values()))
        # its tensors count against capacity.max_pending_bytes from now on, while its avatar loads too
        limit = self.cfg.capacity.max_pending_bytes
        if f.scheduler.pending_bytes + self.loading_bytes + job.nbytes > limit and (
                f.scheduler.pending or self.loading_bytes):
            raise ProtocolError(P.BUSY, f"queued requests hold {f.scheduler.pending_bytes + self.loading_bytes} "
                                f"bytes (capacity.max_pending_bytes = {limit})", req.id)
        self.loading_bytes += job.nbytes

        def ready(e: AvatarEntry) -> None:
            self.loading_bytes -= job.nbytes
            f.pipeline.guard(job, self._avatar_ready, e)
        try:
            self.acquire(name, ready)
        except ProtocolError:
            self.loading_bytes -= job.nbytes
            raise

    def _avatar_ready(self, job: Job, e: AvatarEntry) -> None:
        f = self.front
        self.require_loaded(e)
        req, g, b = job.req, e.graph, job.batch
        expect = {"audio_features": (b, *g.audio_shape), "visual_frames": (b, *g.image_shape)}
        for name, buf in req.buffers.items():
            if buf.shape != expect[name]:
                raise ProtocolError(P.BAD_PAYLOAD, f"buffer {name}: expected float32 {list(expect[name])} for "
                                    f"batch_size {b} and avatar {e.name}, got {list(buf.shape)}")
        if not f.gpus:
            raise ProtocolError(P.INTERNAL, "the engine has no GPU worker")
        too_big = ring_room_error(g, self.cfg.ring.max_face)
        if too_big:
            raise ProtocolError(P.MODEL_ERROR, f"avatar {e.name}: {too_big}")
        if f.conns.get(req.envelope[0]) is None:
            return                                   # the client left while its avatar loaded
        job.entry = e                                # (the scheduler's choice of worker needs it)
        job.indices = np.asarray(frame_index(np.arange(job.start, job.start + b, dtype=np.int64), e.view.n,
                                             job.wrap or e.model.wrap), np.int64)
        job.idle = [False] * b
        try:
            f.scheduler.enqueue(job, time.monotonic(), startable=f.pipeline.startable())
        except QueueFull as err:
            job.entry = None                         # not counted on the avatar: nothing to give back
            raise ProtocolError(P.BUSY, str(err)) from None
        e.inflight += 1
        e.last_used = time.time()
