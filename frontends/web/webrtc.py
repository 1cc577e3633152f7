"""WebRTC out: a viewer gets the avatar as a peer connection, video and audio from one clock.

``POST /api/offer`` with JSON ``{"sdp", "type": "offer", "avatar": NAME}`` (the convention of
Pipecat's SmallWebRTC and aiortc's examples) is answered with ``{"sdp", "type": "answer", "session"}``.
The offer should carry one audio track the peer sends (its microphone, or a WAV file) and receive
audio and video; an offer without an audio track to send gets the avatar's idle frames and silence.

One :class:`PeerSession` per offer, with its own engine connection and a real-time stream:

- **Audio in.** The peer's audio (Opus, 48 kHz) is resampled to 16 kHz mono and pushed into the
  engine stream every 40 ms (a frame), on the gateway's clock: what has arrived is sent, padded with silence
  when the peer sent less (a gap, or no audio track), so the stream never runs dry and the avatar
  shows idle frames while nobody speaks. More than :data:`MAX_BACKLOG_S` waiting (the peer's clock
  runs fast) is dropped, oldest first.
- **Video out.** Each engine frame (a JPEG, paced at 25 frames/s by the engine) is decoded once by
  FFmpeg's MJPEG decoder straight to 4:2:0 planes (the encoders' input: no RGB on the way; with the
  engine's default ``output.chroma_subsampling: "420"``, else the encoder converts) and sent
  with ``pts = 3600 k`` on a 90 kHz clock: frame k is media time 40 k ms, whatever aiortc's own
  track helpers would stamp.
- **Audio out.** The audio the peer sent, delayed to match: when video frame k goes out, the 640
  samples of frame k (its audio, 40 ms) are queued for the audio track, which plays 20 ms frames in
  real time from that queue (silence when it is empty). So the lips and the voice leave in step.

The video codec is H.264 whenever the offer has it, VP8 otherwise; H.264 is encoded by x264 at its
``ultrafast`` preset (:mod:`frontends.web.webrtc_codecs`), VP8 by aiortc's libvpx encoder. ICE: aioice leaves 127.0.0.1 out of its candidates;
on a host with no other interface :func:`allow_loopback` puts it back, so tests on a loopback-only
machine still connect.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import logging
import time
import uuid
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from engine.client import AsyncClient, AsyncStream, EngineError, StreamClosed
from engine.runtime.keys import ClientKeys
from frontends.web import webrtc_codecs

log = logging.getLogger("frontends.web.webrtc")

RATE = 16000                    # the engine's audio rate
SAMPLES_PER_FRAME = 640         # 40 ms at 16 kHz: one video frame's audio
PUSH_S = 0.04                   # audio pushed to the engine every 40 ms (one frame)
MAX_BACKLOG_S = 0.5             # audio in waiting beyond this is dropped
OUT_FRAME = 320                 # 20 ms audio frames out (Opus wants 20 ms)
VIDEO_QUEUE = 3                 # frames waiting for the encoder; older ones are dropped (stay live)
AUDIO_HELD = 5 * 640            # samples of voice waiting to play; beyond, the oldest go (bounded drift)
KEPT = 320                      # samples that may wait when a frame's voice comes, at every frame for a
                                # second (one 20 ms packet: packets against 40 ms frames); more is a backlog
CONNECT_S = 20.0                # a peer not connected by then is closed
VIDEO_CLOCK = 90000


def allow_loopback() -> None:
    """Let aioice offer 127.0.0.1 when the host has no other address (a loopback-only sandbox)."""
    import aioice.ice as ice
    original = ice.get_host_addresses
    if getattr(original, "lse_loopback", False):
        return

    def addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        found = original(use_ipv4, use_ipv6)
        return found or (["127.0.0.1"] if use_ipv4 else [])
    addresses.lse_loopback = True                                # type: ignore[attr-defined]
    ice.get_host_addresses = addresses


class SampleQueue:
    """Audio chunks waiting, in order, each with an optional tag (a frame number): take ``n`` samples
    (zeros where there are none), drop the oldest beyond a bound."""

    def __init__(self, dtype: type) -> None:
        self.dtype = dtype
        self._chunks: collections.deque[tuple[int | None, np.ndarray]] = collections.deque()
        self.held = 0

    def put(self, pcm: np.ndarray, tag: int | None = None, limit: int | None = None) -> None:
        self._chunks.append((tag, pcm))
        self.held += len(pcm)
        while limit is not None and self.held > limit:
            self.held -= len(self._chunks.popleft()[1])

    def drop(self, n: int) -> None:
        """The oldest ``n`` samples go (a chunk cut at its start loses its tag)."""
        while n > 0 and self._chunks:
            tag, head = self._chunks[0]
            if len(head) <= n:
                self._chunks.popleft()
                self.held -= len(head)
                n -= len(head)
            else:
                self._chunks[0] = (None, head[n:])
                self.held -= n
                n = 0

    def take(self, n: int) -> tuple[np.ndarray, list[int]]:
        """``n`` samples, and the tags of the chunks whose first sample is among them."""
        out = np.zeros(n, self.dtype)
        started: list[int] = []
        k = 0
        while k < n and self._chunks:
            tag, head = self._chunks[0]
            if tag is not None:
                started.append(tag)
            m = min(n - k, len(head))
            out[k:k + m] = head[:m]
            k += m
            if m == len(head):
                self._chunks.popleft()
            else:
                self._chunks[0] = (None, head[m:])             # its start has gone out
        self.held -= k
        return out, started


def _remember(times: dict[int, float], number: int, t: float, keep: int = 250) -> None:
    times[number] = t
    if len(times) > keep:
        del times[next(iter(times))]


class AvatarVideo(MediaStreamTrack):
    """The avatar's frames as a video track: JPEGs in, 4:2:0 frames stamped 40 ms apart out."""
    kind = "video"

    def __init__(self, echo: EchoAudio) -> None:
        super().__init__()
        self.echo = echo
        self._queue: asyncio.Queue[tuple[int, bytes, np.ndarray] | None] = asyncio.Queue(maxsize=VIDEO_QUEUE)
        self._decoder = av.CodecContext.create("mjpeg", "r")
        self.sent = 0
        self.decode_s = 0.0
        self.left: dict[int, float] = {}             # frame number -> when it went to the encoder (last 250)

    def put(self, number: int, jpeg: bytes, pcm16: np.ndarray) -> None:
        """Frame ``number`` and its 40 ms of voice; the voice is queued to play when the frame goes out."""
        if self._queue.full():                       # the encoder fell behind: drop the oldest, stay live
            self._queue.get_nowait()
        self._queue.put_nowait((number, jpeg, pcm16))

    def finish(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        item = await self._queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        number, jpeg, pcm16 = item
        self.echo.feed(number, pcm16)
        t0 = time.perf_counter()
        (frame,) = self._decoder.decode(av.Packet(jpeg))
        self.decode_s += time.perf_counter() - t0
        frame.pts = number * (VIDEO_CLOCK // 25)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.sent += 1
        _remember(self.left, number, time.monotonic())
        return frame


class EchoAudio(MediaStreamTrack):
    """The audio of the frames sent, 20 ms at a time in real time; silence when there is none.

    Each frame's voice is queued when the frame goes to the encoder and plays after what already
    waits. After a stall the frames come in a burst and their voice piles up: played in real time
    while more comes at the same rate, that backlog would stay, the voice behind its frames for the
    rest of the session (up to :data:`AUDIO_HELD`; 84-122 ms at the gateway's output in test runs on
    a loaded machine). So when more than :data:`KEPT` has waited at every frame for a second, the
    excess goes, oldest first (as ``lipsync_pipecat.smallwebrtc`` does for Pipecat's transport)."""
    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending = SampleQueue(np.int16)
        self._waited: collections.deque[int] = collections.deque(maxlen=25)    # a second of frames
        self._start: float | None = None
        self._pts = 0
        self.left: dict[int, float] = {}             # frame number -> when its first sample went out

    def feed(self, number: int, pcm16: np.ndarray) -> None:
        self._waited.append(self._pending.held)          # what still waits when this frame's voice comes
        if len(self._waited) == self._waited.maxlen and min(self._waited) > KEPT:     # a lasting backlog
            self._pending.drop(min(self._waited) - KEPT)
            self._waited.clear()
        self._pending.put(pcm16, number if len(pcm16) == SAMPLES_PER_FRAME else None,
                          limit=AUDIO_HELD)          # never more than 0.2 s behind its frames

    def _take(self, n: int) -> np.ndarray:
        out, started = self._pending.take(n)
        for number in started:
            _remember(self.left, number, time.monotonic())
        return out

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += OUT_FRAME
            wait = self._start + self._pts / RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        frame = av.AudioFrame.from_ndarray(self._take(OUT_FRAME)[None, :], format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


class PeerSession:
    """One WebRTC viewer: its peer connection, engine connection and stream, and the tasks between."""

    def __init__(self, endpoint: str, avatar: str, *, keys: ClientKeys | None = None, timeout: float = 60.0) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.avatar = avatar
        self.client = AsyncClient(endpoint, timeout=timeout, keys=keys)
        self.pc = RTCPeerConnection()
        self.audio = EchoAudio()
        self.video = AvatarVideo(self.audio)
        self.stream: AsyncStream | None = None
        self._inbox = SampleQueue(np.float32)       # the peer's audio at 16 kHz, not yet pushed
        self._sent_audio = np.zeros(0, np.float32)   # pushed audio not yet matched with its frame
        self._sent_from = 0                          # stream sample index of _sent_audio[0]
        self._tasks: list[asyncio.Task] = []
        self._taken: dict[int, float] = {}          # pushed chunk j -> when it was taken for the engine
        self.latency: collections.deque[float] = collections.deque(maxlen=500)
        self.closed = asyncio.Event()
        self.frames = 0
        self.error: str | None = None

    async def answer(self, sdp: str, kind: str) -> RTCSessionDescription:
        """Take the offer (audio transceiver first, video second; all its candidates are in it: no
        trickle), open the engine stream, answer; a peer not connected within CONNECT_S is closed."""
        self.pc.addTrack(self.audio)
        self.pc.addTrack(self.video)
        webrtc_codecs.install()
        webrtc_codecs.prefer_h264(next(t for t in self.pc.getTransceivers() if t.kind == "video"))
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        await self.pc.addIceCandidate(None)                  # end of candidates: failure is reported
        self.stream = await self.client.open_stream(self.avatar, realtime=True)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._tasks += [asyncio.create_task(self._push_loop()), asyncio.create_task(self._frame_loop()),
                        asyncio.create_task(self._watchdog())]
        return self.pc.localDescription

    async def _watchdog(self) -> None:
        await asyncio.sleep(CONNECT_S)
        if self.pc.connectionState != "connected":
            self.error = f"the peer did not connect within {CONNECT_S:g} s (state {self.pc.connectionState})"
            await self.close()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._tasks.append(asyncio.create_task(self._read_audio(track)))

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close()

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        with contextlib.suppress(MediaStreamError):
            while True:
                for out in resampler.resample(await track.recv()):
                    pcm = out.to_ndarray().reshape(-1).astype(np.float32)
                    self._inbox.put(pcm, limit=int(MAX_BACKLOG_S * RATE))

    async def _push_loop(self) -> None:
        """40 ms of audio to the engine every 40 ms of the gateway's clock."""
        n = int(PUSH_S * RATE)
        start = time.monotonic()
        k = 0
        try:
            while not self.closed.is_set():
                pcm, _ = self._inbox.take(n)
                _remember(self._taken, k, time.monotonic())
                self._sent_audio = np.concatenate([self._sent_audio, pcm])
                assert self.stream is not None
                await self.stream.push(pcm)
                k += 1
                await asyncio.sleep(max(0.0, start + k * PUSH_S - time.monotonic()))
        except (EngineError, ConnectionError) as e:
            self.error = str(e)
            await self.close()

    async def _frame_loop(self) -> None:
        assert self.stream is not None
        try:
            async for f in self.stream.frames():
                lo = f.number * SAMPLES_PER_FRAME - self._sent_from
                pcm = self._sent_audio[max(0, lo):max(0, lo + SAMPLES_PER_FRAME)]
                if self.pc.connectionState == "connected":    # before, nobody would see it: not queued
                    self.video.put(f.number, f.jpeg, np.clip(np.rint(pcm * 32767), -32768, 32767).astype(np.int16))
                    self._note_latency(f.number)
                cut = max(0, lo + SAMPLES_PER_FRAME)
                self._sent_audio = self._sent_audio[cut:]
                self._sent_from += cut
                self.frames += 1
        except (StreamClosed, EngineError) as e:
            self.error = str(e)
        finally:
            self.video.finish()
            await self.close()

    def _note_latency(self, number: int) -> None:
        """Audio in to frame out: from when frame ``number``'s first sample reached the gateway (the
        chunk that held it was taken for the engine at most 40 ms after) to the frame's release."""
        n = int(PUSH_S * RATE)
        j, o = divmod(number * SAMPLES_PER_FRAME, n)
        if j in self._taken:
            self.latency.append(time.monotonic() - (self._taken[j] - (n - o) / RATE))

    def av_offset_ms(self) -> float | None:
        """Median over the last frames of (frame k's audio out - frame k out), in ms: the service's
        own A/V alignment at its output, before the network and the peer's buffers."""
        both = [self.audio.left[k] - t for k, t in list(self.video.left.items()) if k in self.audio.left]
        return 1000 * float(np.median(both)) if both else None

    def figures(self) -> dict[str, Any]:
        return {"session": self.id, "avatar": self.avatar, "frames": self.frames, "video_sent": self.video.sent,
                "decode_ms": 1000 * self.video.decode_s / max(1, self.video.sent),
                "av_offset_ms": self.av_offset_ms(),
                "latency_ms": {f"p{q}": 1000 * float(np.percentile(self.latency, q)) for q in (50, 99)}
                if self.latency else None,
                "state": self.pc.connectionState, "error": self.error}

    async def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        if self.stream is not None:
            with contextlib.suppress(EngineError, ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(self.stream.close(), 5)
        with contextlib.suppress(Exception):
            await self.pc.close()
        self.client.close()


# -- HTTP routes --------------------------------------------------------------------------------------

async def offer(request: Any, endpoint: str, keys: ClientKeys | None, timeout: float,
                peers: dict[str, PeerSession]) -> Any:
    """``POST /api/offer``: answer a peer's offer with the avatar's tracks (see the module doc)."""
    from aiohttp import web

    def error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error": {"code": code, "message": message}}, status=status)
    try:
        body = await request.json()
    except ValueError:
        return error(400, "bad_request", "the body must be JSON: {\"sdp\", \"type\": \"offer\", \"avatar\"}")
    if not isinstance(body, dict) or body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
        return error(400, "bad_request", "expected {\"sdp\": STRING, \"type\": \"offer\", \"avatar\": NAME}")
    avatar = body.get("avatar")
    if not isinstance(avatar, str) or not avatar:
        return error(400, "bad_request", "\"avatar\" (the avatar's name) is missing")
    peer = PeerSession(endpoint, avatar, keys=keys, timeout=timeout)
    try:
        desc = await peer.answer(body["sdp"], "offer")
    except EngineError as e:
        await peer.close()
        return error(404 if e.code == "unknown_model" else 502, e.code, str(e))
    except Exception as e:  # noqa: BLE001 - an SDP aiortc cannot take (OperationError, InvalidStateError ...)
        await peer.close()
        return error(400, "bad_request", f"the offer was refused: {type(e).__name__}: {e}")
    peers[peer.id] = peer
    asyncio.get_running_loop().create_task(_forget(peer, peers))
    log.info("webrtc session %s: avatar %s", peer.id, avatar)
    return web.json_response({"sdp": desc.sdp, "type": desc.type, "session": peer.id})


async def _forget(peer: PeerSession, peers: dict[str, PeerSession]) -> None:
    await peer.closed.wait()
    peers.pop(peer.id, None)
    log.info("webrtc session %s closed: %s", peer.id, peer.figures())


def summary(peers: dict[str, PeerSession]) -> dict[str, Any]:
    """``GET /api/webrtc``: the open sessions' figures and what the H.264 encoders have made."""
    enc = webrtc_codecs.ENCODED
    return {"sessions": [p.figures() for p in peers.values()], "h264_frames": enc["frames"],
            "h264_bytes": enc["bytes"], "h264_bytes_per_frame": enc["bytes"] / enc["frames"] if enc["frames"] else None}


async def close_all(peers: dict[str, PeerSession]) -> None:
    await asyncio.gather(*(p.close() for p in list(peers.values())), return_exceptions=True)
