"""A job's way through the engine, as the front drives it: the scheduler's choice, the ring slot,
the GPU worker's ``run``, the compositors' ``paste`` chunks, then the reply (assembled by
:mod:`engine.front.replies`) or a stream's frames; and what happens when a worker or compositor dies
on the way. Slot states are those of :class:`engine.runtime.ring.SlotState`; the backend messages
are documented in gpu_worker.py and compositor.py."""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import Any

import numpy as np
import zmq

from engine import protocol as P
from engine.avatars.store import AvatarEntry
from engine.front import replies
from engine.front.jobs import CompHandle, GpuHandle, Job
from engine.front.part import FrontPart
from engine.front.scheduler import WorkerView
from engine.protocol import ProtocolError
from engine.runtime.logs import request_scope
from engine.runtime.ring import SlotState

log = logging.getLogger("engine.front")


class Pipeline(FrontPart):
    def __init__(self, front) -> None:
        super().__init__(front)
        self.comp_waiting: deque[Job] = deque()       # inferred batches waiting for a ready compositor
        self.seq = itertools.count(int(time.time()) & 0xFFFF)

    # -- what runs next --------------------------------------------------------------------------------
    def _views(self) -> list[WorkerView]:
        return [WorkerView(g.idx, g.device, len(g.free), len(g.jobs), set(g.models), g.state == "ready",
                           sum(1 for j in g.jobs.values() if not j.inferred)) for g in self.front.gpus]

    def startable(self) -> int:
        """Jobs the workers could take right now (``capacity.max_pending`` counts what waits beyond)."""
        return sum(w.room(self.cfg.scheduling.worker_queue) for w in self._views())

    def run_scheduler(self, now: float) -> None:
        f = self.front
        for d in f.scheduler.schedule(now, self._views()):
            g = f.gpus[d.worker]
            job = d.batch if d.batch is not None else f.streams.stream_job(d.streams)
            self.guard(job, lambda j: self._start(j, g, g.free.pop(0)))
        for name in f.scheduler.wanted:
            self._load_elsewhere(name)

    def _load_elsewhere(self, name: str) -> None:
        """Work for ``name`` waits and no worker with room holds its network: one more worker loads
        it in its loader thread (one load of a network at a time), serving its other networks
        meanwhile (docs/architecture.md, "GPU workers")."""
        e = self.front.store.entries.get(name)
        ready = [g for g in self.front.gpus if g.state == "ready"]
        if e is None or e.state != "loaded" or any(name in g.loading for g in ready):
            return
        cands = [g for g in ready if name not in g.models]
        if not cands:
            return
        pref = e.model.preferred_gpu
        g = min(cands, key=lambda g: (pref is not None and g.device != pref, len(g.loading), len(g.jobs), g.idx))
        g.loading.add(name)
        self.front.to_backend(g.identity, {"t": "load", "model": name, "onnx": str(e.files.onnx)})

    @request_scope
    def guard(self, job: Job, fn, *args) -> None:
        """Run a step of ``job``: its errors fail the job (an error reply, or its streams close)."""
        try:
            fn(job, *args)
        except ProtocolError as e:
            self.fail(job, e.code, e.message)
        except Exception as e:  # noqa: BLE001
            log.exception("request failed")
            self.fail(job, P.INTERNAL, f"internal error: {e}")

    # -- a job's slot --------------------------------------------------------------------------------
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
        self.front.to_backend(g.identity, {"t": "run", "slot": slot, "seq": seq, "model": e.name,
                                           "onnx": str(e.files.onnx), "batch": b, "fill": fill, **extra})

    def free(self, g: GpuHandle, slot: int) -> None:
        g.ring.set_state(slot, SlotState.FREE)
        g.jobs.pop(slot, None)
        if slot not in g.free:
            g.free.append(slot)

    def fail(self, job: Job, code: str, message: str) -> None:
        """Error reply for a job; its slot (if any) is freed once no compositor holds part of it."""
        if not job.done:
            job.done = True
            if job.streams is not None:
                for b in job.streams:
                    b.stream.inflight -= 1
                    if b.epoch != b.stream.epoch:       # taken before a flush: its frames were dropped anyway
                        b.stream.stale -= 1
                    elif not b.stream.closed:
                        self.front.streams.close(b.stream, (code, f"frames {b.first}..{b.first + b.count - 1}: "
                                                                  f"{message}"))
            else:
                self.front.reply_error(job.req, code, message)
            self.account(job)
        if job.gpu is not None and job.chunks_left == 0 and job.gpu.jobs.get(job.slot) is job:
            self.free(job.gpu, job.slot)
        else:
            self.front.scheduler.cancel(job)

    def account(self, job: Job, ok: bool = False) -> None:
        """The job no longer holds its avatar; a success counts in the avatar's figures."""
        e: AvatarEntry | None = job.entry
        if e is None:
            return
        e.inflight -= 1
        if ok:
            e.requests += 1
            e.total_ms += 1000 * (time.monotonic() - job.t_recv)

    def expire(self, now: float) -> None:
        f = self.front
        limit = self.cfg.supervision.request_timeout_s
        for job in f.scheduler.expire(now, limit):
            self.fail(job, P.BUSY, f"no GPU worker could take the batch within {limit:.0f} s "
                                   "(supervision.request_timeout_s)")
        idle = self.cfg.streams.idle_timeout_s
        for s in list(f.scheduler.streams.values()):
            if s.total is None and now - s.last_audio > idle and (
                    s.fill_until is None                        # idle frames after a flush are not audio
                    or (not s.inflight and not s.ready and s.schedulable() == 0)):
                f.streams.close(s, (P.STREAM_TIMEOUT, f"no audio for {idle:.0f} s (streams.idle_timeout_s)"))

    # -- from the GPU workers ------------------------------------------------------------------------
    def on_gpu(self, g: GpuHandle, msg: dict[str, Any]) -> None:
        f = self.front
        t = msg["t"]
        if t == "ready":
            g.state, g.provider, g.models = "ready", msg["provider"], set(msg.get("models", []))
            g.loading, g.stats = set(msg.get("loading", [])), msg.get("stats", {})
            log.info("GPU worker %d ready (%s, device %s)", g.idx, g.provider, msg.get("device"))
            f.send_state()
            return
        if t == "models":
            g.models = set(msg["models"])
            g.loading, g.stats = set(msg.get("loading", [])), msg.get("stats", g.stats)    # issue 7
            for name, message in msg.get("failed", {}).items():
                if any(name in x.models or name in x.loading for x in f.gpus if x.state == "ready"):
                    log.warning("GPU worker %d could not load %s (%s); others serve it", g.idx, name, message)
                    continue
                why = f"avatar {name}'s network could not be loaded: {message}"
                for job in [j for j in f.scheduler.pending if j.model == name]:
                    f.scheduler.cancel(job)
                    self.fail(job, P.MODEL_ERROR, why)
                for s in [s for s in f.scheduler.streams.values() if s.model == name and not s.inflight]:
                    f.streams.close(s, (P.MODEL_ERROR, why))
            return
        job = g.jobs.get(msg.get("slot", -1))
        if job is None or job.seq != msg.get("seq"):
            return
        if t == "failed":
            self.fail(job, msg["code"], msg["message"])
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
                self.free(g, job.slot)
            elif job.req is not None and job.req.method == "infer":
                self._reply_job(job, *replies.infer_reply(job))
            else:
                self._dispatch(job)

    # -- to and from the compositors -----------------------------------------------------------------
    def _dispatch(self, job: Job) -> None:
        """Split an inferred batch into chunks for the compositors, least loaded first."""
        ready = [c for c in self.front.comps if c.state == "ready"]
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
        self.front.to_backend(c.identity, chunk)

    def on_comp(self, c: CompHandle, msg: dict[str, Any], blobs: list[zmq.Frame]) -> None:
        t = msg["t"]
        if t == "ready":
            c.state = "ready"
            log.info("compositor %d ready", c.idx)
            self.front.send_state()
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
                self.fail(job, *(job.error or (P.INTERNAL, "")))
            elif job.streams is not None:
                self.front.streams.finish_stream_job(job)
            else:
                self._reply_job(job, *replies.composite_reply(job))
                self.front.batches += 1
                self.front.frames_out += job.batch

    def _reply_job(self, job: Job, header: bytes, body: list[bytes]) -> None:
        """The reply of a finished batch; its slot is free as soon as the bytes are copied out."""
        job.done = True
        self.account(job, ok=True)
        self.front.metrics.batch_done(job)
        self.free(job.gpu, job.slot)
        self.front.answer(job.req, job.req.envelope, header, body)

    # -- a worker died -------------------------------------------------------------------------------
    def on_died(self, msg: dict[str, Any]) -> None:
        f = self.front
        role, idx = msg["role"], msg["idx"]
        if role == "gpu":
            g = f.gpus[idx]
            g.state, g.restarts, g.models = "restarting", msg.get("restarts", g.restarts + 1), set()
            g.loading, g.stats = set(), {}
            for slot, job in list(g.jobs.items()):
                state = g.ring.state(slot)
                if state in (SlotState.FILLED, SlotState.QUEUED, SlotState.RUNNING):
                    self.fail(job, P.WORKER_DIED, f"GPU worker {idx} died while running this batch; "
                              "it is being replaced, retry the request")
                elif state == SlotState.INFERRED:       # it died after the Run, before telling us
                    self.on_gpu(g, {"t": "inferred", "slot": slot, "seq": job.seq, "ms": 0.0})
        elif role == "compositor":
            c = f.comps[idx]
            c.state, c.restarts = "restarting", msg.get("restarts", c.restarts + 1)
            lost, c.outstanding = list(c.outstanding.values()), {}
            ready = [x for x in f.comps if x.state == "ready"]
            for job, chunk in lost:
                job.chunks_left -= 1
                if ready:
                    self._send_chunk(job, chunk, min(ready, key=lambda x: (x.load, x.idx)))
                else:
                    job.error = job.error or (P.WORKER_DIED, f"compositor {idx} died and no other is ready")
                    if job.chunks_left == 0:
                        self.fail(job, *job.error)
