"""WebRTC out through the gateway's /api/offer, with a real aiortc peer against a real engine: the peer
sends speech as its microphone, receives the avatar's video and its voice back, in step."""
from __future__ import annotations

import asyncio
import contextlib
import fractions
import time
from pathlib import Path

import av
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from engine.audio.speech import speech_pcm
from engine.cli.demo_avatars import make_audio_encoder
from frontends.web.gateway import make_app
from frontends.web.webrtc import AUDIO_HELD, KEPT, OUT_FRAME, EchoAudio, allow_loopback

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def endpoint(shared_engine, models_root) -> str:
    make_audio_encoder(models_root)
    allow_loopback()
    return shared_engine.endpoint


class Speech(MediaStreamTrack):
    """A microphone that says ``pcm`` (16 kHz float32) in real time, 20 ms at a time, then silence;
    ``said[i]`` is when its 20 ms frame i left."""
    kind = "audio"

    def __init__(self, pcm: np.ndarray) -> None:
        super().__init__()
        self.pcm = np.clip(np.rint(pcm * 32767), -32768, 32767).astype(np.int16)
        self.k = 0
        self.start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.start is None:
            self.start = time.monotonic()
        wait = self.start + self.k * 0.02 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = np.zeros(320, np.int16)
        part = self.pcm[320 * self.k:320 * (self.k + 1)]
        chunk[:len(part)] = part
        f = av.AudioFrame.from_ndarray(chunk[None, :], format="s16", layout="mono")
        f.sample_rate, f.pts, f.time_base = 16000, 320 * self.k, fractions.Fraction(1, 16000)
        self.k += 1
        return f


async def receive(track: MediaStreamTrack, out: list, until: float) -> None:
    with contextlib.suppress(MediaStreamError):
        while time.monotonic() < until:
            f = await asyncio.wait_for(track.recv(), 10)
            out.append((time.monotonic(), f))


async def call(endpoint: str, cache: Path, pcm: np.ndarray | None, seconds: float, codec: str | None = None,
               avatar: str = "demo") -> dict:
    app = make_app(endpoint, cache_dir=cache)
    http = TestClient(TestServer(app))
    await http.start_server()
    pc = RTCPeerConnection()
    video: list = []
    audio: list = []
    tasks: list[asyncio.Task] = []
    until = time.monotonic() + seconds
    try:
        if pcm is not None:
            pc.addTrack(Speech(pcm))
        else:
            pc.addTransceiver("audio", direction="recvonly")
        vt = pc.addTransceiver("video", direction="recvonly")
        if codec:
            from aiortc.rtcrtpsender import RTCRtpSender
            caps = RTCRtpSender.getCapabilities("video").codecs
            vt.setCodecPreferences([c for c in caps if c.mimeType == codec])         # offer only that one
        pc.on("track", lambda t: tasks.append(asyncio.ensure_future(receive(t, video if t.kind == "video" else audio,
                                                                            until))))
        await pc.setLocalDescription(await pc.createOffer())
        r = await http.post("/api/offer", json={"sdp": pc.localDescription.sdp, "type": "offer", "avatar": avatar})
        body = await r.json()
        if r.status != 200:
            return {"status": r.status, "body": body}
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        await asyncio.gather(*tasks, return_exceptions=True)
        from frontends.web.gateway import PEERS
        offsets = [p.av_offset_ms() for p in app[PEERS].values()]
        return {"status": 200, "video": video, "audio": audio, "sdp": body["sdp"],
                "av_offset_ms": offsets[0] if offsets else None}
    finally:
        await pc.close()
        await http.close()


@pytest.mark.realtime
def test_a_peer_speaks_and_gets_the_avatar_at_25_frames_per_second_with_its_voice(endpoint, tmp_path, models_root):
    pcm = np.concatenate([np.zeros(8000, np.float32), speech_pcm(3.0, seed=4), np.zeros(48000, np.float32)])
    got = asyncio.run(call(endpoint, tmp_path, pcm, seconds=8.0))
    assert got["status"] == 200, got
    video, audio = got["video"], got["audio"]
    assert len(video) > 100 and len(audio) > 200
    # steady 25 frames/s over the last 4 s, stamped 40 ms apart on the 90 kHz clock
    t_end = video[-1][0]
    recent = [v for v in video if v[0] > t_end - 4.0]
    assert len(recent) >= 24 * 4 - 2, len(recent)
    pts = np.array([f.pts for _, f in video])
    assert (np.diff(pts) % 3600 == 0).all() and np.median(np.diff(pts)) == 3600
    # the mouth differs from the avatar's own frame while it speaks, not in the silences around it
    change = np.array([mouth_change(models_root, f) for _, f in video])
    talking = change > 1.4 * np.median(change[:10]) + 1          # idle: the codec's loss alone
    assert not talking[:10].any() and talking.sum() >= 40 and not talking[-10:].any()
    # its voice comes back: loud audio while it talks, silence around
    energy = np.array([np.abs(f.to_ndarray().astype(np.float32)).mean() for _, f in audio])
    assert energy.max() > 500 and np.median(energy[:20]) < 5
    # and leaves the gateway in step with the video: frame k's audio within a frame of frame k
    # (the voice plays in 20 ms packets on its own clock, in an arbitrary phase against the frames:
    # 15-29 ms when idle, 40.1 ms once in CI under load; the bound is Chromium's playout one, 60 ms)
    assert got["av_offset_ms"] is not None and abs(got["av_offset_ms"]) < 60, got["av_offset_ms"]


def mouth_change(models_root: Path, frame: av.VideoFrame) -> float:
    """Mean difference, in the lower half of the face, between a received frame and the avatar's
    own frame it was made from (frame k shows avatar frame frame_index(k))."""
    import json
    import cv2
    from engine.kernels.image import frame_index
    demo = models_root / "demo"
    frames = sorted((demo / "frames").iterdir())
    k = frame.pts // 3600
    i = int(frame_index(k, len(frames)))
    x1, y1, x2, y2 = json.loads((demo / "crop_rects.json").read_text())[i]
    own = cv2.imread(str(frames[i]), cv2.IMREAD_GRAYSCALE)[(y1 + y2) // 2:y2, x1:x2].astype(np.float32)
    got = frame.to_ndarray(format="gray")[(y1 + y2) // 2:y2, x1:x2].astype(np.float32)
    return float(np.abs(got - own).mean())


@pytest.mark.realtime
def test_without_a_microphone_the_peer_gets_idle_frames(endpoint, tmp_path):
    got = asyncio.run(call(endpoint, tmp_path, None, seconds=5.0))
    assert got["status"] == 200, got
    # frames flow from the first on, at 25 frames/s (the connection's set-up, which varies with the
    # machine's load, is left out: 56 of 60 once in CI over a 4 s window that included it)
    t = [ts for ts, _ in got["video"]]
    assert len(t) >= 50 and (len(t) - 1) / (t[-1] - t[0]) > 23


@pytest.mark.parametrize("offered, answered", [(None, "H264"), ("video/VP8", "VP8")])
def test_h264_unless_the_peer_offers_only_vp8(endpoint, tmp_path, offered, answered):
    """(aiortc's VP8 encoder is far slower than x264 at ultrafast: the frame rate is measured in the
    tests above and in Chromium, on the H.264 path.)"""
    got = asyncio.run(call(endpoint, tmp_path, speech_pcm(2.0, seed=1), seconds=4.0, codec=offered))
    assert got["status"] == 200, got
    assert got["sdp"].split("m=video")[1].split("a=rtpmap:")[1].split()[1].startswith(answered + "/")
    assert len(got["video"]) >= 25


@pytest.mark.parametrize("body, status, code", [
    ({"sdp": "v=0", "type": "offer"}, 400, "bad_request"),
    ({"type": "answer", "sdp": "x", "avatar": "demo"}, 400, "bad_request"),
    ({"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
      "a=rtpmap:96 AV1/90000\r\na=mid:0\r\n", "avatar": "demo"}, 400, "bad_request"),    # no codec in common
])
def test_bad_offers_are_refused_clearly(endpoint, tmp_path, body, status, code):
    async def go():
        http = TestClient(TestServer(make_app(endpoint, cache_dir=tmp_path)))
        await http.start_server()
        try:
            r = await http.post("/api/offer", json=body)
            return r.status, await r.json()
        finally:
            await http.close()
    st, js = asyncio.run(go())
    assert st == status and js["error"]["code"] == code


def test_an_unknown_avatar_is_a_404_with_the_engines_code(endpoint, tmp_path):
    got = asyncio.run(call(endpoint, tmp_path, None, seconds=1.0, avatar="nobody"))
    assert got["status"] == 404 and got["body"]["error"]["code"] == "unknown_model"


def test_a_lasting_voice_backlog_after_a_stall_is_dropped_and_jitter_is_not():
    """The gateway's audio track (no network, no clock: frames fed, 20 ms packets taken as aiortc
    would). Steady frames with jitter keep every sample; a burst after a stall leaves a backlog that
    would keep the voice behind its frames; within two seconds of frames it is cut to KEPT."""
    audio = EchoAudio()
    voice = np.arange(640, dtype=np.int16)
    frame = 0
    played: list[int] = []

    def step(packets: int) -> int:
        nonlocal frame
        waiting = audio._pending.held
        audio.feed(frame, voice)
        frame += 1
        for _ in range(packets):
            before = set(audio.left)
            audio._take(OUT_FRAME)
            played.extend(sorted(set(audio.left) - before))
        return waiting
    # jitter: packets taken 1, 3, 2, 2 ... per frame (the same 25 frames/s on average): nothing dropped
    waits = [step(p) for p in [1, 3, 2, 2] * 20]
    assert max(waits) <= KEPT and played == list(range(frame)), (waits, played[-5:])
    # a stall, then its frames in a burst: 5 frames' voice waits, and would at every frame after
    for _ in range(5):
        step(0)
    waits = [step(2) for _ in range(75)]
    assert waits[0] == 5 * 640 <= AUDIO_HELD
    assert all(w <= KEPT for w in waits[-25:]), waits
    assert set(range(frame - 26, frame - 1)) <= set(played)   # each frame's voice starts by the next frame
