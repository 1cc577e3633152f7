"""Real-time streams: audio in as it is spoken, JPEG frames out in order at 25 frames/s.

This module holds a stream's state and the decisions about it; it has no sockets (the front owns
those) and no clock of its own (times come in as arguments or ``time.monotonic()`` at push). A
stream goes::

    PCM chunks --push--> raw PCM kept until needed (bounded: streams.max_audio_ahead_s)
      --(scheduler takes frames [a, b))--> StreamingMel turns just enough PCM into final mel
      windows: frames a-8 .. b+6 (the network's audio input of frame i is the encoder output of
      frames i-8 .. i+7); they travel to a GPU worker, which runs the audio encoder and the
      lip-sync network; compositors paste and encode; the front puts the JPEGs in the stream's
      reorder buffer and releases them in order, each at its due time.

The mel is computed lazily, a job's worth at a time, so a push of 30 s of audio costs the front a
copy, not 30 s of spectrogram at once; and the same audio gives the same windows however it is
chunked (``StreamingMel`` is chunking-invariant).

Silence is decided per frame: frame i is *idle* (no network; the avatar's own frame is sent) when
the mel windows of its whole audio context, frames i-8 .. i+7 inside the clip, are silence. That
depends only on the audio, never on how it was chunked or batched.

Latency budget of a frame (real time, audio pushed as it is spoken):
  audio look-ahead   frame i needs audio up to the end of frame i+7's mel window: ~490 ms after
                     frame i's first sample (REFERENCE.md section 5: 8 frames + the 200 ms STFT window)
  batching           none: frames are scheduled as soon as their audio is complete and their
                     deadline comes up (engine/front/scheduler.py)
  inference + paste  one Run and one JPEG per frame (see docs/performance.md)
  pacing             frames wait for their due time; ``late_ms`` says by how much one missed it
Due times: frame k of a stream is due at ``t0 + k / 25``. ``t0`` is set when the first frame is
ready. When the stream ran dry because the client's audio came after a frame's due time (a pause),
``t0`` moves later, to when that frame is ready (lateness measures the engine, not the speaker's
pauses). Before ``t0`` is known the stream's opening time stands in for it.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.audio.mel import FPS, SAMPLE_RATE, SILENCE, StreamingMel, frame_count, frames_final, samples_needed
from engine.kernels.image import frame_index

MAX_CHUNK_SAMPLES = 16000 * 30          # one push may carry at most 30 s of audio
CONTEXT = 8                              # encoder outputs of frames i-8 .. i+7 make frame i's input
UTTERANCE_LEAD_S = 0.55                  # after a flush, new audio starts at the frame due this long after it
                                         # arrives: the 490 ms look-ahead plus time to render (docs/protocol.md 7.7)
FILL_LEAD_S = 0.12                       # idle fill after a flush: frames scheduled this long before they are due
_ids = itertools.count(1)


class StreamStateError(ValueError):
    """A push the stream's state does not allow (its audio already ended)."""


class AudioFull(ValueError):
    """A push beyond the stream's bound on audio not yet played out (back-pressure)."""


@dataclass(eq=False)
class StreamBatch:
    """Frames [first, first + count) of one stream, and the mel windows their audio input needs."""
    stream: Stream
    first: int
    count: int
    win_first: int                       # first frame whose mel window is included (>= the utterance's base)
    windows: np.ndarray | None           # [n, 1, 80, 16]; None once copied into the ring
    indices: list[int]                   # avatar frame of each frame
    idle: list[bool]                     # per frame: its whole audio context is silence
    nwin: int = 0                        # number of windows (kept when ``windows`` is dropped)
    epoch: int = 0                       # the stream's flush count when taken (older results are dropped)

    def __post_init__(self) -> None:
        if self.windows is not None:
            self.nwin = len(self.windows)

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
    pcm: deque = field(default_factory=deque)      # pushed PCM not yet turned into mel columns
    received: int = 0                    # samples pushed
    next_frame: int = 0                  # next frame (stream-relative) to schedule
    next_out: int = 0                    # next frame to deliver
    total: int | None = None             # frame count once the audio ended
    inflight: int = 0                    # batches at the GPU workers / compositors
    ready: dict[int, tuple[bytes, dict[str, Any]]] = field(default_factory=dict)
    t0: float | None = None
    resume_from: int | None = None       # first frame after the stream ran dry (its clock restarts there)
    opened: float = field(default_factory=time.monotonic)
    last_audio: float = field(default_factory=time.monotonic)
    sent_times: deque = field(default_factory=lambda: deque(maxlen=50))
    late_ms: float = 0.0
    max_late_ms: float = 0.0
    first_frame_ms: float | None = None
    closed: bool = False
    n_avatar: int = 1                    # the avatar's frame count (frame index mapping)
    preferred_gpu: int | None = None     # the avatar's preferred GPU
    entry: Any = None                    # the front's AvatarEntry (pinned while the stream is open)
    encoder: str = ""                    # audio encoder ONNX path
    # barge-in (flush): the audio is an utterance whose sample 0 belongs to frame ``base``; frames
    # [next_frame, fill_until) have no audio and are idle by decree (``fill_until`` None: until audio comes)
    base: int = 0
    fill_until: int | None = 0
    epoch: int = 0                       # flushes so far
    stale: int = 0                       # batches in flight taken before the last flush

    # -- audio -------------------------------------------------------------------------------------
    def push(self, pcm: np.ndarray, end: bool, max_ahead_s: float | None = None) -> None:
        """Keep a chunk (copied: the caller's buffer may go away). Raises StreamStateError after
        the end, AudioFull when the chunk would take the audio not yet played out past
        ``max_ahead_s`` (nothing is kept then)."""
        if self.total is not None:
            raise StreamStateError(f"stream {self.id}'s audio already ended (end=true was sent); "
                                   "open a new stream for more audio")
        base = self.base
        if self.fill_until is None:
            # the first audio after a flush: it starts at the first frame that can be made from audio
            # arriving now in real time (due a look-ahead and a render from now); idle frames fill
            # the gap. An end with no audio ends the stream at the next frame.
            base = self.next_frame
            if pcm.size:
                base = max(base, int(np.ceil((time.monotonic() + UTTERANCE_LEAD_S - self.clock(0)) * FPS)))
        if max_ahead_s is not None and pcm.size:
            ahead = (self.received + pcm.size) / SAMPLE_RATE - max(0, self.next_out - base) / FPS
            if ahead > max_ahead_s:
                raise AudioFull(f"stream {self.id} would hold {ahead:.1f} s of audio not yet played out, more "
                                f"than streams.max_audio_ahead_s = {max_ahead_s:g} s; push this chunk again once "
                                f"frames have been delivered")
        if self.fill_until is None and (pcm.size or end):
            self.base = self.fill_until = base
        if pcm.size:
            self.pcm.append(np.array(pcm))
            self.received += pcm.size
            self.last_audio = time.monotonic()
        if end:
            self.total = self.base + frame_count(self.received)

    def flush(self) -> dict[str, Any]:
        """Barge-in: drop the audio not yet turned into frames and every frame not yet sent (ready,
        or in flight: those come back and are dropped); the stream goes on from its next frame with
        idle frames until audio comes again, which starts a new utterance (:meth:`push`). After
        ``end`` the stream ends at its next frame instead."""
        n = self.next_out
        dropped = self.next_frame - n
        audio = max(0.0, self.received / SAMPLE_RATE - max(0, n - self.base) / FPS)
        self.ready.clear()
        self.epoch += 1
        self.stale = self.inflight
        self.next_frame = n
        self.resume_from = None
        if self.total is not None:
            self.total, self.fill_until = n, n
        else:
            self.mel, self.pcm, self.received = StreamingMel(), deque(), 0
            # a real-time stream shows idle frames until audio comes; one that is not waits for it
            self.base, self.fill_until = n, (None if self.realtime else n)
        now = time.monotonic()
        if self.realtime and (self.t0 is None or self.clock(n) < now):
            self.t0 = now - n / FPS                      # not started, behind or dry: frame n is due now, no burst
        return {"stream": self.id, "frames_dropped": dropped, "audio_dropped_s": round(audio, 3), "next_frame": n}

    @property
    def filling(self) -> bool:
        """Between a flush and the frame where the next utterance starts: idle frames by decree."""
        return self.fill_until is None or self.next_frame < self.fill_until

    @property
    def audio_seconds(self) -> float:
        return self.received / SAMPLE_RATE

    def audio_ahead_s(self) -> float:
        """Audio received but not yet played out as delivered frames."""
        return max(0.0, self.received / SAMPLE_RATE - max(0, self.next_out - self.base) / FPS)

    def frames_final(self) -> int:
        """Frames (stream numbers) whose own mel window is final with the audio received so far."""
        return self.total if self.total is not None else self.base + frames_final(self.received)

    def schedulable(self) -> int:
        """How many frames from ``next_frame`` on can be made now: idle fill frames due soon after a
        flush, else those whose whole audio input is final."""
        if self.filling:
            soon = int((time.monotonic() + FILL_LEAD_S - self.clock(0)) * FPS) + 1
            end = soon if self.fill_until is None else min(soon, self.fill_until)
            if self.total is not None:
                end = min(end, self.total)
            return max(0, end - self.next_frame)
        if self.total is not None:
            return max(0, self.total - self.next_frame)
        # frame i needs the windows of frames up to i+7
        return max(0, self.frames_final() - (CONTEXT - 1) - self.next_frame)

    def _feed(self, frames: int) -> None:
        """Turn pushed PCM into mel columns until the windows of frames < ``frames`` are final."""
        mel = self.mel
        frames -= self.base                              # the utterance's own frame numbers
        if mel.finished or mel.frames_ready() >= frames:
            return
        if self.total is not None and frames > frames_final(self.received):
            target = self.received                     # past the last final window: all of it, then the end rule
        else:
            target = samples_needed(frames - 1)
        while self.pcm and mel.samples < target:
            chunk = self.pcm[0]
            take = target - mel.samples
            if take >= chunk.size:
                mel.push(self.pcm.popleft())
            else:
                mel.push(chunk[:take])
                self.pcm[0] = chunk[take:]
        if self.total is not None and not self.pcm:
            mel.finish()

    def take(self, count: int, now: float) -> StreamBatch:
        """The next ``count`` frames as a batch (caller checked ``schedulable``)."""
        a, b = self.next_frame, self.next_frame + count
        if self.filling:                                 # after a flush: no audio, idle by decree
            windows = np.zeros((0, 1, 80, 16), np.float32)
            w0, idle = a, [True] * count               # the avatar's own frames, whatever idle_frames says
        else:
            limit = self.total if self.total is not None else self.frames_final()
            w0, w1 = max(self.base, a - CONTEXT), min(b + CONTEXT - 1, limit)
            self._feed(w1)
            windows = self.mel.windows(w0 - self.base, w1 - w0)
            silent = (windows <= SILENCE + 1e-6).reshape(len(windows), -1).all(axis=1)
            idle = [self.idle_frames and bool(silent[max(self.base, i - CONTEXT) - w0:min(i + CONTEXT, limit) - w0].all())
                    for i in range(a, b)]
        self.next_frame = b
        ks = np.arange(self.start_frame + a, self.start_frame + b, dtype=np.int64)
        indices = np.asarray(frame_index(ks, self.n_avatar, self.wrap)).tolist()
        if self.dry() and now >= self.clock(a):
            # it ran dry and this frame is already due: its audio came late (a pause of the
            # speaker), so the schedule restarts when this frame is ready. Audio that came in time
            # moves nothing: a slow job then shows as lateness, it does not add latency for good.
            self.resume_from = a
        self.inflight += 1
        return StreamBatch(self, a, count, w0, windows, indices, idle, epoch=self.epoch)

    # -- timing ------------------------------------------------------------------------------------
    def dry(self) -> bool:
        """Started, and everything sent: the stream ran dry waiting for the client's audio."""
        return self.realtime and self.t0 is not None and self.inflight == self.stale and not self.ready

    def clock(self, k: int) -> float:
        """Nominal time of frame ``k``: its due time once the stream has started (``t0``)."""
        base = self.t0 if self.t0 is not None else self.opened
        return base + k / FPS

    def lag_ms(self, now: float) -> float:
        """How late the next frame to send is now, when the engine owes it (its audio is there):
        0 while the stream waits for the client's audio, and always 0 when not real time."""
        if not self.realtime or self.t0 is None or self.finished:
            return 0.0
        owed = self.next_out in self.ready or self.inflight > self.stale or self.schedulable() > 0
        return max(0.0, 1000 * (now - self.clock(self.next_out))) if owed else 0.0

    # -- delivery ----------------------------------------------------------------------------------
    def deliverable(self, now: float) -> list[tuple[int, bytes, dict[str, Any]]]:
        """Frames to send now, in order (pacing: not before their due time in real-time mode)."""
        out = []
        while self.next_out in self.ready:
            k = self.next_out
            if self.t0 is None:
                self.t0 = now - k / FPS
                self.first_frame_ms = 1000 * (now - self.opened)
            elif k == self.resume_from:
                self.t0 = max(self.t0, now - k / FPS)   # after a dry spell the clock restarts here
                self.resume_from = None
            if self.realtime and now < self.clock(k):
                break
            jpeg, meta = self.ready.pop(k)
            late = max(0.0, 1000 * (now - self.clock(k))) if self.realtime else 0.0
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
            return self.clock(self.next_out)
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
        lag = self.lag_ms(now)
        return {"stream": self.id, "model": self.model, "realtime": self.realtime,
                "audio_s": round(self.audio_seconds, 3), "audio_ahead_s": round(self.audio_ahead_s(), 3),
                "frames_sent": self.next_out, "frames_scheduled": self.next_frame, "frames_total": self.total,
                "rate_fps": round(self.rate(now), 2), "lag_ms": round(lag, 1),
                "max_lag_ms": round(max(self.max_late_ms, lag), 1), "inflight_batches": self.inflight,
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

