"""Real-time streams: audio in as it is spoken, JPEG frames out in order at 25 frames/s.

This module holds a stream's state and the decisions about it; it has no sockets (the front owns
those). A stream goes::

    PCM chunks --StreamingMel--> final mel windows --(scheduler)--> a batch of frames [a, b)
      needs the mel windows of frames a-8 .. b+7 (the network's audio input of frame i is the
      encoder output of frames i-8 .. i+7): they travel to a GPU worker, which runs the audio
      encoder and the lip-sync network; compositors paste and encode; the front puts the JPEGs in
      the stream's reorder buffer and releases them in order, each at its due time.

Latency budget of a frame (real time, audio pushed as it is spoken):
  audio look-ahead   frame i needs audio up to the end of frame i+7's mel window: ~490 ms after
                     frame i's first sample (REFERENCE.md section 5: 8 frames + the 200 ms STFT window)
  batching           none: a batch is scheduled as soon as frames are ready (at most
                     ``batch_frames`` of them; more only when the stream fell behind)
  inference + paste  one Run and one JPEG per frame (see docs/performance.md)
  pacing             frames wait for their due time; ``late_ms`` says by how much one missed it
Due times: frame k of a stream is due at ``t0 + (k - first) / 25``. ``t0`` is set when the first
frame is ready, and moved later when the stream ran dry because the client's audio had not arrived
(lateness measures the engine, not the speaker's pauses).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .audio import FPS, SILENCE, StreamingMel, frame_count
from .kernels import frame_index

MAX_CHUNK_SAMPLES = 16000 * 30          # one push may carry at most 30 s of audio
CONTEXT = 8                              # encoder outputs of frames i-8 .. i+7 make frame i's input
_ids = itertools.count(1)


@dataclass(eq=False)
class StreamBatch:
    """Frames [first, first + count) of one stream, and the mel windows their audio input needs."""
    stream: Stream
    first: int
    count: int
    win_first: int                       # first frame whose mel window is included (>= 0)
    windows: np.ndarray                  # [n, 1, 80, 16]
    indices: list[int]                   # avatar frame of each frame
    idle: bool                           # every window is silence: no network needed

    @property
    def pad_before(self) -> int:
        """Zero encoder vectors before the first window (frames before 0)."""
        return self.win_first - (self.first - CONTEXT)


@dataclass(eq=False)
class Stream:
    id: str
    owner: list[bytes]                   # routing envelope of the client that opened it
    model: str
    start_frame: int
    wrap: str
    realtime: bool
    idle_frames: bool
    mel: StreamingMel = field(default_factory=StreamingMel)
    next_frame: int = 0                  # next frame (stream-relative) to schedule
    next_out: int = 0                    # next frame to deliver
    total: int | None = None             # frame count once the audio ended
    inflight: int = 0                    # batches at the GPU workers / compositors
    ready: dict[int, tuple[bytes, dict[str, Any]]] = field(default_factory=dict)
    t0: float | None = None
    opened: float = field(default_factory=time.monotonic)
    last_audio: float = field(default_factory=time.monotonic)
    sent_times: deque = field(default_factory=lambda: deque(maxlen=50))
    late_ms: float = 0.0
    max_late_ms: float = 0.0
    first_frame_ms: float | None = None
    closed: bool = False
    entry: Any = None                    # the front's AvatarEntry (pinned while the stream is open)
    encoder: str = ""                    # audio encoder ONNX path

    # -- audio -------------------------------------------------------------------------------------
    def push(self, pcm: np.ndarray, end: bool) -> None:
        if self.total is not None:
            raise ValueError("the stream's audio already ended")
        if pcm.size:
            self.mel.push(pcm)
            self.last_audio = time.monotonic()
        if end:
            self.mel.finish()
            self.total = frame_count(self.mel.samples)

    @property
    def audio_seconds(self) -> float:
        return self.mel.samples / 16000.0

    def schedulable(self) -> int:
        """How many frames from ``next_frame`` on have their whole audio input final."""
        ready = self.mel.frames_ready()
        if self.total is not None:
            return max(0, self.total - self.next_frame)
        # frame i needs the windows of frames up to i+7
        return max(0, ready - (CONTEXT - 1) - self.next_frame)

    def take(self, count: int, n_avatar: int) -> StreamBatch:
        """The next ``count`` frames as a batch (caller checked ``schedulable``)."""
        a, b = self.next_frame, self.next_frame + count
        limit = self.total if self.total is not None else self.mel.frames_ready()
        w0, w1 = max(0, a - CONTEXT), min(b + CONTEXT - 1, limit)
        windows = self.mel.windows(w0, w1 - w0)
        self.next_frame = b
        ks = np.arange(self.start_frame + a, self.start_frame + b)
        indices = np.asarray(frame_index(ks, n_avatar, self.wrap)).tolist()
        idle = self.idle_frames and bool(np.all(windows <= SILENCE + 1e-6))
        if self.t0 is not None and self.inflight == 0 and not self.ready and self.realtime:
            # ran dry waiting for audio: the schedule restarts from now
            self.t0 = max(self.t0, time.monotonic() - a / FPS)
        self.inflight += 1
        return StreamBatch(self, a, count, w0, windows, indices, idle)

    def deadline(self) -> float:
        """When the next frame to schedule is due (its scheduling priority)."""
        base = self.t0 if self.t0 is not None else self.opened
        return base + self.next_frame / FPS

    # -- delivery ----------------------------------------------------------------------------------
    def due(self, k: int) -> float:
        assert self.t0 is not None
        return self.t0 + k / FPS

    def deliverable(self, now: float) -> list[tuple[int, bytes, dict[str, Any]]]:
        """Frames to send now, in order (pacing: not before their due time in real-time mode)."""
        out = []
        while self.next_out in self.ready:
            k = self.next_out
            if self.t0 is None:
                self.t0 = now - k / FPS
                self.first_frame_ms = 1000 * (now - self.opened)
            if self.realtime and now < self.due(k):
                break
            jpeg, meta = self.ready.pop(k)
            late = max(0.0, 1000 * (now - self.due(k))) if self.realtime else 0.0
            self.late_ms = late
            self.max_late_ms = max(self.max_late_ms, late)
            meta.update(frame=k, pts_ms=k * 1000 // FPS, late_ms=round(late, 1),
                        last=self.total is not None and k == self.total - 1)
            self.sent_times.append(now)
            self.next_out += 1
            out.append((k, jpeg, meta))
        return out

    def next_due(self) -> float | None:
        if self.realtime and self.next_out in self.ready and self.t0 is not None:
            return self.due(self.next_out)
        return None

    @property
    def finished(self) -> bool:
        return self.total is not None and self.next_out >= self.total

    def rate(self, now: float) -> float:
        recent = [t for t in self.sent_times if now - t <= 2.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(1e-6, recent[-1] - recent[0])

    def describe(self, now: float) -> dict[str, Any]:
        return {"stream": self.id, "model": self.model, "realtime": self.realtime,
                "audio_s": round(self.audio_seconds, 3), "frames_sent": self.next_out,
                "frames_scheduled": self.next_frame, "frames_total": self.total,
                "rate_fps": round(self.rate(now), 2), "lag_ms": round(self.late_ms, 1),
                "max_lag_ms": round(self.max_late_ms, 1), "inflight_batches": self.inflight,
                "first_frame_ms": None if self.first_frame_ms is None else round(self.first_frame_ms, 1),
                "age_s": round(now - self.opened, 1)}


def new_stream_id() -> str:
    return f"s{next(_ids)}"


def check_pcm(pcm: np.ndarray, end: bool) -> np.ndarray:
    """Validate one pushed chunk; raises ValueError naming the problem."""
    if pcm.ndim != 1:
        raise ValueError(f"pcm must be one channel, shape [n]; got shape {list(pcm.shape)}")
    if pcm.size == 0 and not end:
        raise ValueError("empty pcm chunk (send at least one sample, or end=true)")
    if pcm.size > MAX_CHUNK_SAMPLES:
        raise ValueError(f"pcm chunk of {pcm.size} samples is longer than {MAX_CHUNK_SAMPLES} (30 s); "
                         "split it")
    if pcm.dtype == np.float32 and pcm.size and not np.isfinite(pcm).all():
        raise ValueError("pcm contains NaN or infinite samples")
    return pcm
