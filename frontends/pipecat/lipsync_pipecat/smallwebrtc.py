"""Pipecat's SmallWebRTC transport made to carry the avatar's video and voice in step.

The service hands out each frame's 40 ms of voice and then the frame, together, at the engine's
25 frames/s. Three things in SmallWebRTC (pipecat-ai 1.14) then pull them apart; :func:`fix_av_sync`
changes them for every SmallWebRTC transport of the process (call it once, before the pipeline runs):

- **The video clock.** SmallWebRTC's video track stamps frames 1/30 s apart and paces them at 30
  frames/s whatever the frame rate, so a 25 frames/s video clock runs at 83 % of real time and
  drifts from its audio. Each frame is stamped instead with the time it is sent, on the 90 kHz
  clock, with no pacing of its own; when the encoder falls behind, frames beyond
  :data:`VIDEO_QUEUE` waiting are dropped, oldest first; and it takes the service's 4:2:0 planes
  (``image_format="I420"``: no RGB on the way, the encoders' own input) as well as RGB
  (:func:`fix_video_clock`, also on its own).
- **The voice's writes.** The output transport writes the voice in 40 ms chunks and waits for each
  chunk to be played before it writes the next; the track sends silence whenever its queue is empty.
  On a busy event loop the next chunk often comes a few milliseconds late: 10 ms of silence is put
  into the speech each time, and the voice falls further behind the pictures with every one, for
  as long as the voice goes on (1.1-1.2 s after 4 s with writes 12 ms late and one 150 ms late, in
  ``tests/test_smallwebrtc.py``; 39-49 ms with this change). Here a write queues the chunk and returns: the track plays it in
  real time, 10 ms at a time, as before. A stall still leaves the voice behind (what waits in the
  queue stays there while more comes at the same rate), so when more than :data:`KEPT` of it has
  waited at every write for a second, the excess is dropped, oldest first; more than
  :data:`AUDIO_HELD_S` waiting is dropped at once. So the voice is never far behind its frames.
- **The video pacing.** For live video the output transport holds each image until its own 25
  frames/s clock, started at the first image, says it is due: about one frame (40 ms) after it came,
  while its voice goes straight on. The engine already paces the frames (the service pushes them as
  they come), so on a SmallWebRTC transport images are drawn as they come.
"""
from __future__ import annotations

import collections
import fractions
import time

import numpy as np
from av import VideoFrame

CLOCK = 90000
VIDEO_QUEUE = 3                 # frames waiting for the encoder; older ones are dropped (stay live)
I420 = "I420"                   # OutputImageRawFrame.format of full-range 4:2:0 planes (Y, then U, then V)
AUDIO_HELD_S = 0.2              # voice waiting beyond this is dropped at once
KEPT = 2                        # 10 ms chunks that may wait at every write for a second (jitter)


def fix_av_sync() -> None:
    """All three changes above (idempotent)."""
    fix_video_clock()
    _fix_audio_writes()
    _fix_live_pacing()


def fix_video_clock() -> None:
    """Make every SmallWebRTC video track of this process stamp frames by the wall clock (idempotent)."""
    from pipecat.transports.smallwebrtc.transport import RawVideoTrack
    if getattr(RawVideoTrack.recv, "lse_wallclock", False):
        return

    async def recv(self):                                       # type: ignore[no-untyped-def]
        raw = await self._video_buffer.get()
        while self._video_buffer.qsize() >= VIDEO_QUEUE:        # the encoder fell behind: stay live
            raw = self._video_buffer.get_nowait()
        pixels = np.frombuffer(raw.image, dtype=np.uint8)
        if raw.format == I420:                                   # the service's planes (image_format="I420")
            frame = VideoFrame.from_ndarray(pixels.reshape((self._height * 3 // 2, self._width)), format="yuvj420p")
        else:
            frame = VideoFrame.from_ndarray(pixels.reshape((self._height, self._width, 3)), format="rgb24")
        now = time.monotonic()
        start = getattr(self, "_lse_start", None)
        if start is None:
            start = self._lse_start = now
        frame.pts = int((now - start) * CLOCK)
        frame.time_base = fractions.Fraction(1, CLOCK)
        return frame
    recv.lse_wallclock = True                                   # type: ignore[attr-defined]
    RawVideoTrack.recv = recv


def _fix_audio_writes() -> None:
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCClient
    if getattr(SmallWebRTCClient.write_audio_frame, "lse_queued", False):
        return

    async def write_audio_frame(self, frame) -> bool:           # type: ignore[no-untyped-def]
        track = self._audio_output_track
        if not (self._can_send() and track):
            return False
        queue = track._chunk_queue                              # 10 ms chunks
        waited = track.__dict__.setdefault("_lse_waited", collections.deque(maxlen=25))
        waited.append(len(queue))                               # what still waits when 40 ms more come
        if len(waited) == waited.maxlen and min(waited) > KEPT:  # a lasting backlog, not jitter
            _drop(queue, min(waited) - KEPT)
            waited.clear()
        track.add_audio_bytes(frame.audio)                      # played from the queue in real time, not awaited
        _drop(queue, len(queue) - int(AUDIO_HELD_S * 100))
        return True
    write_audio_frame.lse_queued = True                         # type: ignore[attr-defined]
    SmallWebRTCClient.write_audio_frame = write_audio_frame


def _drop(queue: collections.deque, n: int) -> None:
    """The oldest ``n`` chunks of a SmallWebRTC audio track's queue, their writers told they are done."""
    for _ in range(max(0, n)):
        _chunk, done = queue.popleft()
        if done is not None and not done.done():
            done.set_result(True)


def _fix_live_pacing() -> None:
    from pipecat.transports.base_output import BaseOutputTransport
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCOutputTransport
    sender = BaseOutputTransport.MediaSender
    paced = sender._video_is_live_handler
    if getattr(paced, "lse_unpaced", False):
        return

    async def video_is_live_handler(self) -> None:              # type: ignore[no-untyped-def]
        if not isinstance(self._transport, SmallWebRTCOutputTransport):
            return await paced(self)
        image = await self._video_queue.get()
        await self._draw_image(image)
        self._video_queue.task_done()
    video_is_live_handler.lse_unpaced = True                    # type: ignore[attr-defined]
    sender._video_is_live_handler = video_is_live_handler


def allow_loopback() -> None:
    """Let aioice offer 127.0.0.1 when the host has no other address (a loopback-only sandbox)."""
    import aioice.ice as ice
    original = ice.get_host_addresses
    if getattr(original, "lse_loopback", False):
        return

    def addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return original(use_ipv4, use_ipv6) or (["127.0.0.1"] if use_ipv4 else [])
    addresses.lse_loopback = True                               # type: ignore[attr-defined]
    ice.get_host_addresses = addresses
