"""The front's stream methods (``stream_open``, ``stream_audio``, ``stream_close``), scheduling
and paced delivery; mixed into :class:`engine.front.Front`, whose sockets and scheduler they use.
The stream state itself and its decisions are in :mod:`engine.streams`."""
from __future__ import annotations

import logging
import time

import numpy as np

from . import protocol as P
from .avatar_store import AvatarEntry
from .config import WRAP_MODES
from .jobs import Job
from .protocol import ProtocolError
from .streams import Stream, StreamBatch, check_pcm, new_stream_id

log = logging.getLogger("engine.front")
MAX_AHEAD_FRAMES = 75            # a stream may be rendered at most 3 s ahead of what it has sent


class StreamMethods:
    """Stream handling of the front (a mixin: it runs on the front's thread, with its state)."""

    def _client_gone(self, identity: bytes) -> None:
        for s in [s for s in self.streams.values() if s.owner[0] == identity]:
            log.info("stream %s: client gone, closing it", s.id)
            self._close_stream(s)

    def _guard_request(self, req: P.Request, fn, *args) -> None:
        try:
            fn(*args)
        except ProtocolError as e:
            self.reply_error(req.envelope, req.id, e.code, e.message)
        except Exception as e:  # noqa: BLE001
            log.exception("request failed")
            self.reply_error(req.envelope, req.id, P.INTERNAL, f"internal error: {e}")

    def _encoder_path(self, e: AvatarEntry) -> str:
        name = self.cfg.streams.audio_encoder
        for cand in (e.files.folder / name, self.cfg.models_dir / name):
            if cand.is_file():
                return str(cand)
        raise ProtocolError(P.MODEL_ERROR, f"avatar {e.name} has no audio encoder: neither {e.files.folder / name} "
                            f"nor {self.cfg.models_dir / name} exists")

    def do_stream_open(self, req: P.Request) -> None:
        p = req.params
        name = P.check_str(p, "model", req_id=req.id)
        rate = P.check_int(p, "sample_rate", 1, None, default=16000, req_id=req.id)
        if rate != 16000:
            raise ProtocolError(P.BAD_REQUEST, f"params.sample_rate must be 16000 (16 kHz mono PCM), got {rate}; "
                                "resample on the client", req.id)
        start = P.check_int(p, "start_frame", 0, None, default=0, req_id=req.id)
        wrap = p.get("wrap")
        if wrap is not None:
            wrap = P.check_str(p, "wrap", WRAP_MODES, req_id=req.id)
        flags = {}
        for key in ("realtime", "idle_frames"):
            v = p.get(key, True)
            if v is None:
                v = True
            if not isinstance(v, bool):
                raise ProtocolError(P.BAD_REQUEST, f"params.{key} must be true or false, got {v!r}", req.id)
            flags[key] = v
        if len(self.streams) >= self.cfg.streams.max_streams:
            raise ProtocolError(P.BUSY, f"{len(self.streams)} streams are open (streams.max_streams)", req.id)

        def opened(e: AvatarEntry) -> None:
            if e.state != "loaded":
                raise ProtocolError(P.MODEL_ERROR, f"avatar {e.name} could not be loaded: {e.error}")
            if len(self.streams) >= self.cfg.streams.max_streams:     # others opened while it loaded
                raise ProtocolError(P.BUSY, f"{len(self.streams)} streams are open (streams.max_streams)")
            encoder = self._encoder_path(e)
            s = Stream(new_stream_id(), list(req.envelope), name, start, wrap or e.model.wrap,
                       flags["realtime"], flags["idle_frames"])
            s.entry, s.encoder = e, encoder
            e.inflight += 1                       # an open stream pins its avatar in memory
            e.last_used = time.time()
            self.streams[s.id] = s
            log.info("stream %s opened on %s (realtime %s)", s.id, name, s.realtime)
            self.reply_ok(req, {"stream": s.id, "model": name, "fps": 25, "sample_rate": 16000,
                                "samples_per_frame": 640, "lookahead_ms": 490, "realtime": s.realtime,
                                "frames": e.view.n, "width": e.view.width, "height": e.view.height})
        self._acquire(name, lambda e: self._guard_request(req, opened, e))

    def _stream(self, req: P.Request) -> Stream:
        sid = P.check_str(req.params, "stream", req_id=req.id)
        s = self.streams.get(sid)
        if s is None or s.owner[0] != req.envelope[0]:
            raise ProtocolError(P.UNKNOWN_STREAM, f"no open stream {sid!r} on this connection", req.id)
        return s

    def do_stream_audio(self, req: P.Request) -> None:
        s = self._stream(req)
        end = req.params.get("end", False)
        if not isinstance(end, bool):
            raise ProtocolError(P.BAD_REQUEST, f"params.end must be true or false, got {end!r}", req.id)
        buf = req.buffers.get("pcm")
        if buf is None or set(req.buffers) != {"pcm"}:
            raise ProtocolError(P.BAD_PAYLOAD, "a stream_audio request carries exactly one buffer, pcm", req.id)
        if buf.dtype not in ("float32", "int16"):
            raise ProtocolError(P.BAD_PAYLOAD, f"buffer pcm: dtype must be float32 or int16, got {buf.dtype}", req.id)
        try:
            pcm = check_pcm(buf.array(), end)
            s.push(pcm, end)
        except ValueError as e:
            raise ProtocolError(P.BAD_PAYLOAD, f"buffer pcm: {e}", req.id) from None
        self.reply_ok(req, {"stream": s.id, "samples": s.mel.samples, "audio_s": round(s.audio_seconds, 3),
                            "frames_ready": s.next_frame + s.schedulable(), "ended": s.total is not None,
                            "frames_total": s.total})
        self._schedule_streams()
        self._deliver_streams()

    def do_stream_close(self, req: P.Request) -> None:
        s = self._stream(req)
        sent = s.next_out
        self._close_stream(s)
        self.reply_ok(req, {"stream": s.id, "frames_sent": sent})

    def _close_stream(self, s: Stream, error: tuple[str, str] | None = None) -> None:
        if s.closed:
            return
        s.closed = True
        self.streams.pop(s.id, None)
        s.ready.clear()
        s.entry.inflight -= 1
        if error is not None:
            log.warning("stream %s closed: %s", s.id, error[1])
            self._send_client([*s.owner, P.event_message("stream_error", s.id, s.describe(time.monotonic()),
                                                         error=error)])

    def _schedule_streams(self) -> None:
        """Turn ready stream frames into GPU jobs, one job per free ring slot, most urgent first.

        Frames are taken only when a slot can run them, so the choice is made as late as possible:
        the stream whose next frame is due first (fewest batches in flight breaking ties) picks the
        avatar, and every ready stream of that avatar joins the job (one Run for all of them).
        """
        cfg = self.cfg.streams
        while self.streams:
            ready = [g for g in self.gpus if g.state == "ready"]
            # issue 7: jobs waiting for a network still loading hold no slot and must not count
            free = sum(len(g.free) for g in ready) - sum(1 for j in self.pending if any(j.model in g.models for g in ready))
            if free <= 0:
                return
            # bounded run-ahead: a stream fed faster than real time does not render (and hold) its
            # whole utterance at once, nor take slots from streams whose frames are due now
            eligible = sorted((s for s in self.streams.values()
                               if s.inflight < cfg.max_inflight_batches and s.schedulable() > 0
                               and s.next_frame - s.next_out < MAX_AHEAD_FRAMES),
                              key=lambda s: (s.deadline(), s.inflight))
            if not eligible:
                return
            model, group, frames = eligible[0].model, [], 0
            for s in eligible:
                if s.model != model:
                    continue
                n = s.schedulable()
                alone = len(self.streams) == 1 and n > 2 * cfg.batch_frames       # catching up alone
                count = min(n, cfg.batch_frames * (3 if alone else 1), self.cfg.ring.max_batch - frames)
                if count <= 0:
                    break
                group.append(s.take(count, s.entry.view.n))
                frames += count
            self._submit_stream_job(group, all(b.idle for b in group))

    def _submit_stream_job(self, batches: list[StreamBatch], idle: bool) -> None:
        e = batches[0].stream.entry
        job = Job(None, e.name, sum(b.count for b in batches), 0, None, time.monotonic(), entry=e,
                  indices=np.asarray([i for b in batches for i in b.indices], np.int64), streams=batches, idle=idle)
        e.inflight += 1
        self._guard(job, self._submit)

    def _finish_stream_job(self, job: Job) -> None:
        g, row = job.gpu, 0
        for b in job.streams:
            s = b.stream
            s.inflight -= 1
            for j in range(b.count):
                i = row + j
                if not s.closed:
                    blob = job.inline.get(i)
                    jpeg = bytes(blob.buffer) if blob is not None else bytes(g.ring.jpeg_area(job.slot, i)[:job.sizes[i]])
                    s.ready[b.first + j] = (jpeg, {"avatar_frame": int(job.indices[i]), "idle": job.idle})
            row += b.count
        job.done = True
        self._account(job, ok=True)
        self.frames_out += job.batch
        self._free(g, job.slot)                  # schedules the next stream frames
        self._deliver_streams()

    def _deliver_streams(self) -> None:
        now = time.monotonic()
        for s in list(self.streams.values()):
            for k, jpeg, meta in s.deliverable(now):
                header = P.event_message("frame", s.id, meta, [{"name": "frame", "dtype": "jpeg", "count": 1}])
                if not self._send_client([*s.owner, header, jpeg]):
                    break
            if s.finished and not s.closed:
                self._send_client([*s.owner, P.event_message("stream_end", s.id, s.describe(now))])
                self._close_stream(s)
