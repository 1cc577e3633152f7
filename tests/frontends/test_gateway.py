"""The web gateway without a browser: HTTP routes and WebSocket sessions against a real engine."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from engine.audio.speech import speech_pcm
from engine.cli.demo_avatars import make_audio_encoder
from engine.client import Client
from frontends.web.gateway import make_app, pack_frame, unpack_frame
from tests.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def endpoint(shared_engine, models_root) -> str:
    make_audio_encoder(models_root)          # streams need <models_root>/audio_encoder.onnx
    return shared_engine.endpoint


def run(coro, timeout: float = 60.0):
    """``coro`` under ``timeout``; then the loop's end, where every task the gateway left is cancelled,
    must take under 3 s: a task that ignores its cancel (a gateway that hangs on a closed WebSocket)
    fails the test. (asyncio.timeout, not wait_for: under Python 3.11 a cancel wait_for sends can be
    swallowed, and it then returns as if nothing had timed out.)"""
    ended: list[float] = []

    async def bounded():
        try:
            async with asyncio.timeout(timeout):
                return await coro
        finally:
            ended.append(time.monotonic())
    out = asyncio.run(bounded())
    assert time.monotonic() - ended[0] < 3, f"the gateway's tasks took {time.monotonic() - ended[0]:.1f} s to end"
    return out


@contextlib.asynccontextmanager
async def gateway(endpoint: str, cache: Path, **kw):
    client = TestClient(TestServer(make_app(endpoint, cache_dir=cache, **kw)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def next_json(ws, timeout: float = 30.0) -> dict:
    """The next text message (frames in between are an error here)."""
    msg = await ws.receive(timeout)
    assert msg.type == WSMsgType.TEXT, f"expected a text message, got {msg.type} {str(msg.data)[:80]}"
    return json.loads(msg.data)


async def collect(ws, timeout: float = 30.0) -> tuple[list[tuple[dict, bytes, float]], dict]:
    """Frames (meta, jpeg, arrival time) until the end or an error message, and that message."""
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(max(0.1, deadline - time.monotonic()))
        if msg.type == WSMsgType.BINARY:
            meta, jpeg = unpack_frame(msg.data)
            frames.append((meta, jpeg, time.monotonic()))
        elif msg.type == WSMsgType.TEXT:
            body = json.loads(msg.data)
            if body["type"] in ("end", "error"):
                return frames, body
            raise AssertionError(f"unexpected message {body}")
        else:
            raise AssertionError(f"WebSocket {msg.type}: {msg.data}")


def check_frames(frames: list[tuple[dict, bytes, float]], count: int) -> None:
    assert [m["frame"] for m, _, _ in frames] == list(range(count))
    assert [m["pts_ms"] for m, _, _ in frames] == [40 * k for k in range(count)]
    assert [m["last"] for m, _, _ in frames] == [False] * (count - 1) + [True]
    for meta, jpeg, _ in frames:
        assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
        assert set(meta) >= {"frame", "pts_ms", "late_ms", "idle", "last", "avatar_frame"}


def test_pack_unpack_roundtrip() -> None:
    meta = {"frame": 3, "pts_ms": 120, "late_ms": 1.5, "idle": False, "last": True}
    data = pack_frame(meta, b"\xff\xd8jpeg\xff\xd9")
    assert int.from_bytes(data[:4], "little") == len(json.dumps(meta, separators=(",", ":")))
    assert unpack_frame(data) == (meta, b"\xff\xd8jpeg\xff\xd9")


def test_avatars_page_and_static_files(endpoint, tmp_path) -> None:
    async def go():
        async with gateway(endpoint, tmp_path / "cache") as c:
            r = await c.get("/api/avatars")
            assert r.status == 200
            body = await r.json()
            assert body["engine"] == endpoint
            demo = next(a for a in body["avatars"] if a["name"] == "demo")
            assert isinstance(demo["loaded"], bool) and demo["frames"] == 12

            r = await c.get("/")
            assert r.status == 200 and "/static/player.js" in await r.text()
            r = await c.get("/static/player.js")
            assert r.status == 200 and "javascript" in r.headers["Content-Type"]
            assert "window.player" in await r.text()
            assert (await c.get("/static/capture-worklet.js")).status == 200
            assert (await c.get("/static/nothing.js")).status == 404
            assert (await c.get("/static/%2e%2e/gateway.py")).status == 404
            assert (await c.get("/static/..%2fgateway.py")).status == 404

            r = await c.get("/static/speech.wav")
            assert r.status == 200
            data = await r.read()
            with wave.open(io.BytesIO(data)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
                assert w.getnframes() == 6 * 16000
            assert (tmp_path / "cache" / "speech.wav").read_bytes() == data   # cached

            r = await c.get("/api/health")
            assert r.status == 200 and "streams" in await r.json()
    run(go())


def test_ws_stream_float32_gets_every_frame_in_order(endpoint, tmp_path) -> None:
    pcm = speech_pcm(2.0)                       # 32000 samples: 50 frames

    async def go():
        async with gateway(endpoint, tmp_path) as c:
            ws = await c.ws_connect("/ws")
            await ws.send_str(json.dumps({"type": "open", "avatar": "demo", "realtime": False}))
            opened = await next_json(ws)
            assert opened["type"] == "opened" and opened["format"] == "f32"
            info = opened["stream"]
            assert (info["model"], info["fps"], info["sample_rate"]) == ("demo", 25, 16000)
            for i in range(0, pcm.size, 1280):
                await ws.send_bytes(pcm[i:i + 1280].astype("<f4").tobytes())
            await ws.send_str(json.dumps({"type": "end"}))
            frames, end = await collect(ws)
            assert end == {"type": "end", "stream": info["stream"], "frames": 50}
            check_frames(frames, 50)
            assert len({hash(j) for _, j, _ in frames}) > 5        # the picture changes
            await ws.close()
    run(go())


@pytest.mark.realtime                                       # asserts the pacing
def test_ws_stream_int16_realtime_is_paced(endpoint, tmp_path) -> None:
    pcm = (speech_pcm(1.2) * 32767).astype("<i2")    # 19200 samples: 30 frames

    async def go():
        async with gateway(endpoint, tmp_path) as c:
            ws = await c.ws_connect("/ws")
            await ws.send_str(json.dumps({"type": "open", "avatar": "demo", "realtime": True, "format": "s16"}))
            assert (await next_json(ws))["format"] == "s16"
            await ws.send_bytes(pcm.tobytes())                     # all at once: the engine paces
            await ws.send_str(json.dumps({"type": "end"}))
            frames, end = await collect(ws)
            assert end["type"] == "end" and end["frames"] == 30
            check_frames(frames, 30)
            span = frames[-1][2] - frames[0][2]
            assert span >= 0.7 * 29 / 25, f"30 real-time frames arrived within {span:.2f} s"
            await ws.close()
    run(go())


def test_ws_bad_input_is_answered_and_the_gateway_keeps_serving(endpoint, tmp_path) -> None:
    async def error_for(ws, payload) -> dict:
        if isinstance(payload, bytes):
            await ws.send_bytes(payload)
        else:
            await ws.send_str(payload if isinstance(payload, str) else json.dumps(payload))
        msg = await next_json(ws)
        assert msg["type"] == "error" and msg["message"], msg
        return msg

    async def go():
        async with gateway(endpoint, tmp_path) as c:
            ws = await c.ws_connect("/ws")
            assert (await error_for(ws, "not json {"))["code"] == "bad_request"
            assert (await error_for(ws, "[1, 2]"))["code"] == "bad_request"
            assert (await error_for(ws, {"type": "dance"}))["code"] == "bad_request"
            assert (await error_for(ws, {"type": "end"}))["code"] == "bad_request"
            assert (await error_for(ws, b"\x00" * 64))["code"] == "no_stream"
            assert (await error_for(ws, {"type": "open"}))["code"] == "bad_request"
            assert (await error_for(ws, {"type": "open", "avatar": "demo", "realtime": "yes"}))["code"] == "bad_request"
            assert (await error_for(ws, {"type": "open", "avatar": "demo", "format": "f64"}))["code"] == "bad_request"
            assert (await error_for(ws, {"type": "open", "avatar": "demo", "start_frame": -1}))["code"] == "bad_request"
            unknown = await error_for(ws, {"type": "open", "avatar": "no_such_avatar"})
            assert unknown["code"] == "unknown_model" and "no_such_avatar" in unknown["message"]

            # the same connection still opens a stream
            await ws.send_str(json.dumps({"type": "open", "avatar": "demo", "realtime": False}))
            assert (await next_json(ws))["type"] == "opened"
            assert (await error_for(ws, {"type": "open", "avatar": "demo"}))["code"] == "bad_request"  # one at a time
            assert (await error_for(ws, b"\x00" * 5))["code"] == "bad_payload"                        # half a sample
            nan = np.full(640, np.nan, np.float32).tobytes()
            assert (await error_for(ws, nan))["code"] == "bad_payload"                                # the engine's check
            await ws.send_bytes(speech_pcm(0.4).tobytes())
            await ws.send_str(json.dumps({"type": "end"}))
            frames, end = await collect(ws)
            assert end["type"] == "end"
            check_frames(frames, 10)
            assert (await error_for(ws, b"\x00" * 64))["code"] == "no_stream"                        # it ended
            await ws.close()

            # another connection and the HTTP API are unaffected
            assert (await c.get("/api/avatars")).status == 200
            ws2 = await c.ws_connect("/ws")
            await ws2.send_str(json.dumps({"type": "ping", "t": 7}))
            assert await next_json(ws2) == {"type": "pong", "t": 7}
            await ws2.close()
    run(go())


def test_closing_the_websocket_closes_the_engine_stream(endpoint, tmp_path) -> None:
    def open_streams() -> set[str]:
        with Client(endpoint, timeout=10) as cl:
            return {s["stream"] for s in cl.health()["streams"]}

    async def go():
        async with gateway(endpoint, tmp_path) as c:
            ws = await c.ws_connect("/ws")
            await ws.send_str(json.dumps({"type": "open", "avatar": "demo", "realtime": True}))
            sid = (await next_json(ws))["stream"]["stream"]
            await ws.send_bytes(speech_pcm(1.0).tobytes())          # no end: the stream stays open
            msg = await ws.receive(20)
            assert msg.type == WSMsgType.BINARY
            assert sid in await asyncio.to_thread(open_streams)
            await ws.close()
            deadline = time.monotonic() + 10
            while sid in await asyncio.to_thread(open_streams):
                assert time.monotonic() < deadline, f"engine stream {sid} still open after the WebSocket closed"
                await asyncio.sleep(0.1)

            # the explicit close message does the same and the connection stays usable
            ws = await c.ws_connect("/ws")
            await ws.send_str(json.dumps({"type": "open", "avatar": "demo"}))
            sid = (await next_json(ws))["stream"]["stream"]
            await ws.send_str(json.dumps({"type": "close"}))
            while True:                                   # frames may not come: no audio was sent
                msg = await ws.receive(10)
                if msg.type == WSMsgType.TEXT:
                    assert json.loads(msg.data) == {"type": "closed", "stream": sid}
                    break
            assert sid not in await asyncio.to_thread(open_streams)
            await ws.send_str(json.dumps({"type": "open", "avatar": "demo"}))
            assert (await next_json(ws))["type"] == "opened"
            await ws.close()
    run(go())


def test_engine_unreachable_gives_errors_not_a_crash(tmp_path) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"

    async def go():
        async with gateway(dead, tmp_path, timeout=0.5) as c:
            r = await c.get("/api/avatars")
            assert r.status == 502
            assert (await r.json())["error"]["code"] == "timeout"
            ws = await c.ws_connect("/ws")
            await ws.send_str(json.dumps({"type": "open", "avatar": "demo"}))
            msg = await next_json(ws, 10)
            assert msg["type"] == "error" and msg["code"] == "timeout"
            await ws.close()
            assert (await c.get("/")).status == 200
    run(go())


def test_gateway_with_keys_against_an_engine_with_curve(engine_factory, models_root, tmp_path) -> None:
    from tests.conftest import make_keys
    make_audio_encoder(models_root)
    keys = make_keys(tmp_path / "keys", ("gateway",), ("gateway",))
    eng = engine_factory(server=keys.server_toml())
    pcm = speech_pcm(1.0)

    async def go():
        async with gateway(eng.endpoint, tmp_path, keys=keys.client("gateway")) as c:
            r = await c.get("/api/health")
            assert r.status == 200 and (await r.json())["healthy"]
            ws = await c.ws_connect("/ws")
            await ws.send_str(json.dumps({"type": "open", "avatar": "demo", "realtime": False}))
            assert (await next_json(ws))["type"] == "opened"
            await ws.send_bytes(pcm.astype("<f4").tobytes())
            await ws.send_str(json.dumps({"type": "end"}))
            frames, end = await collect(ws)
            assert end["type"] == "end"
            check_frames(frames, 25)
            await ws.close()
        async with gateway(eng.endpoint, tmp_path) as c:            # no keys: the engine answers nothing
            r = await c.get("/api/health")
            assert r.status == 502 and (await r.json())["error"]["code"] == "timeout"
    run(go(), 90)
