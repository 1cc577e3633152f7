"""WebRTC viewers: the gateway (its own process, so its CPU is its own) serving N aiortc peers at
once, each speaking and receiving the demo avatar at 1280x720: frames per second each peer
receives, the gateway's CPU per viewer, and the bytes per second per viewer against the engine's
JPEGs over the WebSocket path. Prints the figures; asserts nothing about time.

    tools/dev test tests/bench/test_bench_webrtc.py --benchmark-enable -s
    LSE_WEBRTC_VIEWERS=1,2,3,4 LSE_WEBRTC_SECONDS=20 tools/dev test tests/bench/test_bench_webrtc.py -s

(the suite runs 1 viewer for 6 s; docs/performance.md has the longer runs).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from engine.audio.speech import speech_pcm
from engine.cli.demo_avatars import make_audio_encoder
from engine.testing.measure import Report, record
from frontends.web.webrtc import allow_loopback
from tests.conftest import free_port
from tests.frontends.test_webrtc import Speech, receive

REPO = Path(__file__).resolve().parents[2]
VIEWERS = [int(n) for n in os.environ.get("LSE_WEBRTC_VIEWERS", "1").split(",")]
SECONDS = float(os.environ.get("LSE_WEBRTC_SECONDS", "6"))


@pytest.fixture(scope="module")
def gateway(shared_engine, models_root, tmp_path_factory):
    make_audio_encoder(models_root)
    allow_loopback()
    tmp = tmp_path_factory.mktemp("gw")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "frontends.web.gateway", "--engine", shared_engine.endpoint,
                             "--port", str(port), "--cache-dir", str(tmp)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/api/health", timeout=2).read()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
    yield url, psutil.Process(proc.pid)
    proc.terminate()
    proc.wait(10)


async def one_viewer(url: str, seconds: float, seed: int) -> dict:
    import aiohttp
    pc = RTCPeerConnection()
    video: list = []
    pc.addTrack(Speech(np.tile(speech_pcm(4.0, seed=seed), 10)))
    pc.addTransceiver("video", direction="recvonly")
    until = time.monotonic() + seconds
    tasks: list[asyncio.Task] = []
    pc.on("track", lambda t: tasks.append(asyncio.ensure_future(receive(t, video if t.kind == "video" else [], until))))
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/api/offer", json={"sdp": pc.localDescription.sdp, "type": "offer",
                                                      "avatar": "demo"}) as r:
            body = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    await pc.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    times = [t for t, _ in video]
    steady = [t for t in times if t > times[-1] - (seconds - 3)] if times else []
    return {"fps": (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 2 else 0.0}


@pytest.mark.realtime
@pytest.mark.parametrize("n", VIEWERS)
def test_viewers(benchmark, gateway, shared_engine, n):
    url, proc = gateway

    async def all_viewers():
        return await asyncio.gather(*(one_viewer(url, SECONDS, seed) for seed in range(n)))
    cpu0, t0 = proc.cpu_times(), time.monotonic()
    got = asyncio.run(all_viewers())
    cpu1, t1 = proc.cpu_times(), time.monotonic()
    cores = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
    fps = [g["fps"] for g in got]
    jpeg = jpeg_bytes_per_s(shared_engine.endpoint)
    with urllib.request.urlopen(url + "/api/webrtc", timeout=5) as resp:
        bps = 25 * json.load(resp)["h264_bytes_per_frame"]
    r = record(benchmark, Report(f"webrtc {n} viewers", [1 / f for f in fps if f > 0],
                                 extra={"viewers": n, "gateway_cores": cores, "fps": fps, "h264_bytes_per_s": bps,
                                        "jpeg_bytes_per_s": jpeg}))
    print(f"\n{n} WebRTC viewer(s), 1280x720 H.264, {SECONDS:g} s: frames/s each {[round(f, 1) for f in fps]}; "
          f"gateway {cores:.2f} cores ({cores / n:.2f} per viewer, including the setup); "
          f"{8 * bps / 1e6:.2f} Mbit/s per viewer against {8 * jpeg / 1e6:.2f} Mbit/s of JPEGs over the WebSocket")
    assert r.samples and all(f > 0 for f in fps)


def jpeg_bytes_per_s(endpoint: str) -> float:
    """25 x the mean size of the engine's JPEG frames of the same avatar speaking (the WebSocket path)."""
    from engine.client import Client
    with Client(endpoint, timeout=60) as c:
        s = c.open_stream("demo", realtime=False)
        s.push(speech_pcm(2.0, seed=1), end=True)
        sizes = [len(f.jpeg) for f in s.frames(timeout=60)]
    return 25 * float(np.mean(sizes))
