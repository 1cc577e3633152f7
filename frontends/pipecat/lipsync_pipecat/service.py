"""A Pipecat video service backed by the user's own lipsync-engine: put it after the TTS.

It takes the TTS's audio (``TTSAudioRawFrame``, at whatever rate the TTS speaks, resampled here to
16 kHz mono), streams it into a real-time engine stream, and pushes downstream, for each video
frame k the engine makes, frame k's own 40 ms of that audio (a ``TTSAudioRawFrame``, 16 kHz mono,
when the frame carries speech) and then the frame (an ``OutputImageRawFrame``, RGB, decoded once
from the engine's JPEG; or, with ``image_format="I420"``, its 4:2:0 planes: the cheapest form for
SmallWebRTC with :func:`lipsync_pipecat.smallwebrtc.fix_av_sync`, whose encoders take them as they are). So lips and voice leave the service in step: the voice is delayed by as
much as the video (the network's 490 ms look-ahead plus rendering).

- **Idle.** Audio goes to the engine every 40 ms on the service's clock, silence when the TTS is
  quiet, so the engine keeps sending the avatar's idle frames (its own frames, no network run) at
  25 frames/s while nobody speaks; they carry no audio.
- **Barge-in.** On an ``InterruptionFrame`` the voice stops at once: the TTS audio not yet sent is
  dropped, and so is the voice of frames still on their way (a frame that comes before the flush is
  answered goes out without it). Then the engine stream is flushed (``stream_flush``): frames not
  yet sent are dropped there, idle frames follow at once, and the next speech starts a new utterance.
- **End.** ``EndFrame`` and ``CancelFrame`` close the stream and the connection.
- **Errors.** An engine that does not answer within ``connect_timeout`` or an unknown avatar is an
  error pushed upstream (``push_error``, permanent), with the engine's address or the avatar's name
  in it; an engine that goes away mid-stream likewise (never a hang).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np
import simplejpeg
import zmq
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from lipsync_pipecat.engine_client import EngineClient, EngineError

RATE = 16000
FRAME_SAMPLES = 640             # 40 ms: one video frame's audio


class LipsyncVideoService(FrameProcessor):
    """The avatar ``avatar`` of the engine at ``endpoint`` as a Pipecat video service."""

    def __init__(self, *, avatar: str, endpoint: str = "tcp://127.0.0.1:5555",
                 keys: tuple[Path, Path] | None = None, connect_timeout: float = 10.0,
                 image_format: str = "RGB", **kwargs) -> None:
        super().__init__(**kwargs)
        if image_format not in ("RGB", "I420"):
            raise ValueError(f"image_format must be 'RGB' or 'I420', not {image_format!r}")
        self.avatar, self.endpoint, self.keys, self.connect_timeout = avatar, endpoint, keys, connect_timeout
        self.image_format = image_format
        self._mjpeg = None                           # FFmpeg's MJPEG decoder, for I420
        self._client: EngineClient | None = None
        self._stream: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()                  # a push and its bookkeeping, or a flush and its reset
        self.frames_out = 0
        self._reset()

    def _reset(self) -> None:
        """Per-stream state, as before the first push."""
        self._inbox: list[np.ndarray] = []           # TTS audio at 16 kHz not yet sent to the engine
        self._resample: dict[int, object] = {}
        self._utt_frame = 0                          # the current utterance's first frame
        self._audio = np.zeros(0, np.float32)        # the utterance's audio sent, from _audio_from on
        self._real = np.zeros(0, bool)               # which of those samples are the TTS's (not padding)
        self._muted = False                          # from an interruption until its flush is answered
        self._audio_from = 0
        self._new_utterance = True

    # -- frames in ------------------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await self._start()
        elif isinstance(frame, TTSAudioRawFrame):
            if self._client is not None:                     # after a failure, nothing takes it: drop it
                self._inbox.append(self._to_16k(frame))
        elif isinstance(frame, InterruptionFrame):
            await self._interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._stop()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    def _to_16k(self, frame: TTSAudioRawFrame) -> np.ndarray:
        """The TTS's int16 audio (any rate, mono or stereo) as 16 kHz mono float32."""
        import av
        pcm = np.frombuffer(frame.audio, np.int16).reshape(-1, frame.num_channels).mean(axis=1) / 32768.0
        if frame.sample_rate == RATE:
            return pcm.astype(np.float32)
        rs = self._resample.get(frame.sample_rate)
        if rs is None:
            rs = self._resample[frame.sample_rate] = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        af = av.AudioFrame.from_ndarray(pcm.astype(np.float32)[None, :], format="flt", layout="mono")
        af.sample_rate = frame.sample_rate
        out = [f.to_ndarray().reshape(-1) for f in rs.resample(af)]               # type: ignore[attr-defined]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    # -- the engine stream ----------------------------------------------------------------------------

    async def _start(self) -> None:
        if self._client is not None:                          # a second StartFrame: start over
            await self._stop()
        self._reset()
        try:
            self._client = EngineClient(self.endpoint, timeout=self.connect_timeout, keys=self.keys)
        except (OSError, ValueError, zmq.ZMQError) as e:      # the CURVE key files
            await self._fail(f"the lipsync engine client could not be set up: {e}", e)
            return
        try:
            info = await self._client.open_stream(self.avatar)
        except EngineError as e:
            what = (f"the lipsync engine at {self.endpoint} did not answer within {self.connect_timeout:g} s"
                    if e.code == "timeout" else
                    f"the lipsync engine has no avatar {self.avatar!r}" if e.code == "unknown_model" else
                    f"the lipsync engine refused avatar {self.avatar!r}: {e}")
            await self._fail(what, e)
            return
        self._stream = info["stream"]
        self._client.timeout = 5.0                            # a push is answered in milliseconds
        self._tasks = [self.create_task(self._push_loop()), self.create_task(self._frame_loop())]

    async def _fail(self, what: str, e: Exception) -> None:
        await self.push_error(error_msg=what, exception=e, force_treat_as_permanent=True)
        await self._stop()

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        out, real = np.zeros(n, np.float32), np.zeros(n, bool)
        k = 0
        while k < n and self._inbox:
            head = self._inbox[0]
            m = min(n - k, len(head))
            out[k:k + m], real[k:k + m] = head[:m], True
            k += m
            self._inbox[0] = head[m:]
            if not len(self._inbox[0]):
                self._inbox.pop(0)
        return out, real

    async def _push_loop(self) -> None:
        """One frame's audio (40 ms) to the engine every 40 ms: the TTS's, or silence."""
        assert self._client is not None and self._stream is not None
        start, k = time.monotonic(), 0
        try:
            while True:
                async with self._lock:                      # a flush cannot fall between a push and its books
                    pcm, real = self._take(FRAME_SAMPLES)
                    reply = await self._client.push(self._stream, pcm)
                    if self._new_utterance:                 # the first push after the start or a flush
                        self._utt_frame, self._new_utterance = int(reply["utterance_frame"]), False
                        self._audio, self._real, self._audio_from = pcm, real, 0
                    else:
                        self._audio = np.concatenate([self._audio, pcm])
                        self._real = np.concatenate([self._real, real])
                k += 1
                await asyncio.sleep(max(0.0, start + k * FRAME_SAMPLES / RATE - time.monotonic()))
        except EngineError as e:
            await self._fail(f"the lipsync engine at {self.endpoint} stopped the stream: {e}", e)

    async def _frame_loop(self) -> None:
        assert self._client is not None and self._stream is not None
        try:
            while (f := await self._client.next_frame(self._stream)) is not None:
                audio = self._audio_of(f.number)
                if audio is not None and not self._muted:
                    await self.push_frame(TTSAudioRawFrame(audio=audio, sample_rate=RATE, num_channels=1))
                await self.push_frame(self._image(f.jpeg))
                self.frames_out += 1
        except EngineError as e:
            await self._fail(f"the lipsync engine at {self.endpoint} ended the stream: {e}", e)

    def _image(self, jpeg: bytes) -> OutputImageRawFrame:
        """The engine's JPEG decoded once: RGB, or with ``image_format="I420"`` its 4:2:0 planes as
        FFmpeg's MJPEG decoder gives them (full range; Y, then U, then V), which SmallWebRTC's encoders
        take as they are once :func:`lipsync_pipecat.smallwebrtc.fix_av_sync` is in place."""
        if self.image_format == "RGB":
            rgb = simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
            return OutputImageRawFrame(image=rgb.tobytes(), size=(rgb.shape[1], rgb.shape[0]), format="RGB")
        import av
        if self._mjpeg is None:
            self._mjpeg = av.CodecContext.create("mjpeg", "r")
        (frame,) = self._mjpeg.decode(av.Packet(jpeg))
        if frame.format.name != "yuvj420p":                  # the engine's output.chroma_subsampling is not 420
            frame = frame.reformat(format="yuvj420p")
        return OutputImageRawFrame(image=frame.to_ndarray().tobytes(), size=(frame.width, frame.height), format="I420")

    def _audio_of(self, number: int) -> bytes | None:
        """Frame ``number``'s 40 ms of the TTS's audio as int16 bytes; None for a frame without any."""
        lo = (number - self._utt_frame) * FRAME_SAMPLES - self._audio_from
        if lo < 0 or lo >= len(self._audio):
            return None
        pcm, real = self._audio[lo:lo + FRAME_SAMPLES], self._real[lo:lo + FRAME_SAMPLES]
        cut = lo + FRAME_SAMPLES                             # what is before the next frame is not needed
        self._audio, self._real, self._audio_from = self._audio[cut:], self._real[cut:], self._audio_from + cut
        if not real.any():
            return None
        return np.clip(np.rint(pcm * 32767), -32768, 32767).astype(np.int16).tobytes()

    async def _interrupt(self) -> None:
        self._inbox.clear()
        if self._client is None or self._stream is None:
            return
        # silent from now on, not from the flush's reply: that waits for a push in flight, then a
        # round trip, and the frames that come meanwhile would still speak (on a loaded host, 60 to
        # 150 ms of voice after the interruption)
        self._muted = True
        async with self._lock:
            try:
                await self._client.flush(self._stream)
            except EngineError as e:
                failed: EngineError | None = e
            else:
                failed = None
                self._inbox.clear()
                self._new_utterance, self._muted = True, False
                self._audio, self._real, self._audio_from = np.zeros(0, np.float32), np.zeros(0, bool), 0
        if failed is not None:
            await self._fail(f"the lipsync engine at {self.endpoint} refused a flush: {failed}", failed)

    async def _stop(self) -> None:
        me = asyncio.current_task()
        for t in self._tasks:
            if t is not me:
                await self.cancel_task(t)
        self._tasks = []
        if self._client is not None:
            if self._stream is not None:
                with contextlib.suppress(EngineError, asyncio.TimeoutError):
                    self._client.timeout = 2.0
                    await self._client.close_stream(self._stream)
            self._client.close()
        self._client, self._stream = None, None

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._stop()
