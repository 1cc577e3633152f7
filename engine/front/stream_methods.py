"""The front's stream methods (``stream_open``, ``stream_audio``, ``stream_flush``, ``stream_close``), stream jobs and
paced delivery: a part of :class:`engine.front.front.Front`, whose sockets and scheduler it uses.
The stream state and its decisions are in :mod:`engine.front.streams`, what runs next in
:mod:`engine.front.scheduler`."""
from __future__ import annotations

import logging
import time

import numpy as np

from engine import protocol as P
from engine.avatars.store import AvatarEntry
from engine.front import replies
from engine.front.jobs import Job
from engine.front.part import FrontPart
from engine.front.streams import AudioFull, Stream, StreamBatch, StreamStateError, check_pcm, new_stream_id
from engine.protocol import ProtocolError
from engine.runtime.config import WRAP_MODES

log = logging.getLogger("engine.front")


class StreamMethods(FrontPart):
    """Stream handling of the front (on the front's thread, with its state)."""

    def _encoder_path(self, e: AvatarEntry) -> str:
        name = self.cfg.streams.audio_encoder
        for cand in (e.files.folder / name, self.cfg.models_dir / name):
            if cand.is_file():
                return str(cand)
        raise ProtocolError(P.MODEL_ERROR, f"avatar {e.name} has no audio encoder: neither {e.files.folder / name} "
                            f"nor {self.cfg.models_dir / name} exists")

    def _check_stream_room(self, identity: bytes, req_id=None) -> None:
        f = self.front
        cfg = self.cfg.streams
        if len(f.scheduler.streams) >= cfg.max_streams:
            raise ProtocolError(P.BUSY, f"{len(f.scheduler.streams)} streams are open (streams.max_streams)", req_id)
        conn = f.conns.get(identity)
        if conn is not None and len(conn.streams) >= cfg.max_per_client:
            raise ProtocolError(P.BUSY, f"this connection has {len(conn.streams)} streams open "
                                f"(streams.max_per_client)", req_id)
        f.quotas.check_streams(identity, req_id)    # per-key quota (CURVE)

    def do_stream_open(self, req: P.Request) -> None:
        f = self.front
        p = req.params
        conn = f.conns.get(req.envelope[0])
        if conn is not None and conn.socket_type == "REQ":
            raise ProtocolError(P.BAD_REQUEST, "streams need a DEALER socket: a stream's frames are events sent "
                                "without a request, which a REQ socket cannot receive", req.id)
        name = P.check_str(p, "model", req_id=req.id)
        rate = P.check_int(p, "sample_rate", 1, None, default=16000, req_id=req.id)
        if rate != 16000:
            raise ProtocolError(P.BAD_REQUEST, f"params.sample_rate must be 16000 (16 kHz mono PCM), got {rate}; "
                                "resample on the client", req.id)
        start = P.check_int(p, "start_frame", 0, P.MAX_FRAME, default=0, req_id=req.id)
        wrap = p.get("wrap")
        if wrap is not None:
            wrap = P.check_str(p, "wrap", WRAP_MODES, req_id=req.id)
        flags = {key: P.check_bool(p, key, True, req_id=req.id) for key in ("realtime", "idle_frames")}
        self._check_stream_room(req.envelope[0], req.id)

        def opened(e: AvatarEntry) -> None:
            f.requests.require_loaded(e)
            conn = f.conns.get(req.envelope[0])
            if conn is None:
                return                                # the client left while the avatar loaded
            self._check_stream_room(req.envelope[0])  # others opened while it loaded
            encoder = self._encoder_path(e)
            s = Stream(new_stream_id(), list(req.envelope), name, start, wrap or e.model.wrap,
                       flags["realtime"], flags["idle_frames"], n_avatar=e.view.n,
                       preferred_gpu=e.model.preferred_gpu)
            s.entry, s.encoder = e, encoder
            e.inflight += 1                       # an open stream pins its avatar in memory
            e.last_used = time.time()
            f.scheduler.add_stream(s)
            conn.streams.add(s.id)
            f.metrics.stream_opened()
            log.info("stream %s opened on %s (realtime %s)", s.id, name, s.realtime)
            f.reply_ok(req, {"stream": s.id, "model": name, "fps": 25, "sample_rate": 16000,
                             "samples_per_frame": 640, "lookahead_ms": 490, "realtime": s.realtime,
                             "frames": e.view.n, "width": e.view.width, "height": e.view.height})
        f.requests.acquire(name, lambda e: f.requests.guard_request(req, opened, e))

    def _stream(self, req: P.Request) -> Stream:
        f = self.front
        sid = P.check_str(req.params, "stream", req_id=req.id)
        s = f.scheduler.streams.get(sid)
        if s is None or s.owner[0] != req.envelope[0]:
            raise ProtocolError(P.UNKNOWN_STREAM, f"no open stream {sid!r} on this connection", req.id)
        return s

    def do_stream_audio(self, req: P.Request) -> None:
        f = self.front
        s = self._stream(req)
        end = P.check_bool(req.params, "end", False, req_id=req.id)
        buf = req.buffers.get("pcm")
        if buf is None or set(req.buffers) != {"pcm"}:
            raise ProtocolError(P.BAD_PAYLOAD, "a stream_audio request carries exactly one buffer, pcm", req.id)
        if buf.dtype not in ("float32", "int16"):
            raise ProtocolError(P.BAD_PAYLOAD, f"buffer pcm: dtype must be float32 or int16, got {buf.dtype}", req.id)
        try:
            pcm = check_pcm(buf.array(), end)
        except ValueError as e:
            raise ProtocolError(P.BAD_PAYLOAD, f"buffer pcm: {e}", req.id) from None
        try:
            s.push(pcm, end, self.cfg.streams.max_audio_ahead_s)
        except StreamStateError as e:
            raise ProtocolError(P.BAD_REQUEST, str(e), req.id) from None
        except AudioFull as e:
            f.quotas.refund(f.conns.get(req.envelope[0]), req)
            raise ProtocolError(P.BUSY, str(e), req.id) from None
        f.reply_ok(req, {"stream": s.id, "samples": s.received, "utterance_frame": s.base,
                         "audio_s": round(s.audio_seconds, 3),
                         "frames_ready": s.next_frame + s.schedulable(), "ended": s.total is not None,
                         "frames_total": s.total, "audio_ahead_s": round(s.audio_ahead_s(), 3)})

    def do_stream_flush(self, req: P.Request) -> None:
        """Barge-in: the stream drops what it has not sent and shows idle frames until audio comes."""
        s = self._stream(req)
        result = s.flush()
        log.info("stream %s flushed at frame %d (%d frames, %.2f s of audio dropped)", s.id, result["next_frame"],
                 result["frames_dropped"], result["audio_dropped_s"])
        self.front.reply_ok(req, result)
        self.deliver(time.monotonic())

    def do_stream_close(self, req: P.Request) -> None:
        f = self.front
        s = self._stream(req)
        sent = s.next_out
        self.close(s)
        f.reply_ok(req, {"stream": s.id, "frames_sent": sent})

    def close(self, s: Stream, error: tuple[str, str] | None = None) -> None:
        f = self.front
        if s.closed:
            return
        s.closed = True
        f.scheduler.remove_stream(s)
        conn = f.conns.get(s.owner[0])
        if conn is not None:
            conn.streams.discard(s.id)
        s.ready.clear()
        s.pcm.clear()
        s.entry.inflight -= 1
        if error is not None:
            log.warning("stream %s closed: %s", s.id, error[1])
            f.send_client([*s.owner, P.event_message("stream_error", s.id, error=error)])

    def stream_job(self, batches: list[StreamBatch]) -> Job:
        """A GPU job for frames of one or more streams of one avatar (the scheduler's choice)."""
        e = batches[0].stream.entry
        job = Job(None, e.name, sum(b.count for b in batches), 0, None, time.monotonic(), entry=e,
                  indices=np.asarray([i for b in batches for i in b.indices], np.int64), streams=batches,
                  idle=[x for b in batches for x in b.idle])
        e.inflight += 1
        return job

    def finish_stream_job(self, job: Job) -> None:
        f = self.front
        row = 0
        frames = replies.jpegs(job)
        for b in job.streams:
            s = b.stream
            s.inflight -= 1
            if b.epoch != s.epoch:                  # taken before a flush: its frames are dropped
                s.stale -= 1
            elif not s.closed:
                for j in range(b.count):
                    s.ready[b.first + j] = (frames[row + j], {"avatar_frame": int(job.indices[row + j]),
                                                              "idle": job.idle[row + j]})
            row += b.count
        job.done = True
        f.scheduler.observe(job.model, time.monotonic() - job.t_recv)
        f.pipeline.account(job, ok=True)
        f.metrics.stream_job_done(job)
        f.frames_out += job.batch
        f.pipeline.free(job.gpu, job.slot)
        self.deliver(time.monotonic())

    def deliver(self, now: float) -> None:
        f = self.front
        for s in list(f.scheduler.streams.values()):
            if f.conns.blocked(s.owner[0]):
                continue                              # the client is not reading: its frames wait
            for k, jpeg, meta in s.deliverable(now):
                header = P.event_message("frame", s.id, meta, [{"name": "frame", "dtype": "jpeg", "count": 1}])
                f.metrics.stream_frame(s, meta)
                if not f.send_client([*s.owner, header, jpeg]):
                    break
            if s.finished and not s.closed:
                f.send_client([*s.owner, P.event_message("stream_end", s.id, s.describe(now))])
                self.close(s)
