"""HTTP + WebSocket gateway between web browsers and the engine's front (ZeroMQ, protocol v1).

Routes::

    GET /                 the player page (static/index.html)
    GET /webrtc           the WebRTC page (static/webrtc.html): the avatar as a peer connection
    GET /static/<file>    the page's files; /static/speech.wav is generated on first request
                          (engine.audio.speech, 6 s of speech-like audio) into the cache folder
    GET /api/avatars      {"engine": endpoint, "avatars": [{"name", "loaded", "state", "frames"}]}
                          from the engine's ``models`` method (502 + {"error": {code, message}} when
                          the engine does not answer)
    GET /api/health       the engine's ``health`` reply, as JSON (502 likewise)
    GET /ws               WebSocket: one lip-sync stream at a time per connection
    POST /api/offer       WebRTC: {"sdp", "type": "offer", "avatar"} -> {"sdp", "type": "answer", "session"};
                          the avatar's video and audio as a peer connection (webrtc.py, which
                          says how; needs the ``webrtc`` extra, else 501)
    GET /api/webrtc       the open WebRTC sessions' figures (frames, A/V offset at the output, state)
                          and the H.264 frames and bytes encoded so far

WebSocket protocol (browser -> gateway)::

    text   {"type": "open", "avatar": NAME, "realtime": true, "format": "f32" | "s16",
            "start_frame": 0, "idle_frames": true}       all but avatar optional
    binary 16 kHz mono PCM: float32 little-endian ("f32", the default) or int16 little-endian
           ("s16"), any length (whole samples), sent as it is spoken
    text   {"type": "end"}     the audio is complete: the remaining frames follow, then "end"
    text   {"type": "close"}   drop the stream now (answered by {"type": "closed"})

gateway -> browser::

    text   {"type": "opened", "stream": {...}}   the engine's stream_open reply (stream id, fps,
                                                 sample_rate, lookahead_ms, width, height, frames)
    binary one frame: uint32 little-endian N, then N bytes of UTF-8 JSON
           {"frame", "pts_ms", "late_ms", "idle", "last", "avatar_frame"}, then the JPEG bytes
    text   {"type": "end", "stream": id, "frames": count}         after the last frame
    text   {"type": "error", "code": CODE, "message": TEXT}       engine errors keep the engine's
                                                                  code (unknown_model, bad_payload,
                                                                  stream_timeout ...); the gateway's
                                                                  own: bad_request, no_stream, internal

Each WebSocket connection has its own :class:`engine.client.AsyncClient` (its own DEALER socket);
closing the WebSocket closes its engine stream. Bad input is answered with an error message and
the connection stays usable; nothing a browser sends stops the gateway.

Command line::

    python -m frontends.web.gateway --engine tcp://127.0.0.1:5555 --host 127.0.0.1 --port 8080
        [--server-key keys/server.key --client-key keys/gateway.key_secret]    (an engine with CURVE)

With keys, every engine connection of the gateway is a CURVE client with that one key: the engine
sees one client (its quotas apply to all the gateway's browsers together). The gateway's own HTTP
side has no authentication: keep it on a trusted interface, or behind a proxy that has.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from engine.client import AsyncClient, AsyncStream, EngineError, StreamClosed
from engine.runtime.keys import CertificateError, ClientKeys

__all__ = ["make_app", "pack_frame", "unpack_frame", "main", "STATIC_DIR"]

log = logging.getLogger("frontends.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_WS_MESSAGE = 4 * 1024 * 1024        # a binary message carries at most ~30 s of float32 audio (engine limit)
PCM_FORMATS = {"f32": np.dtype("<f4"), "float32": np.dtype("<f4"), "s16": np.dtype("<i2"), "int16": np.dtype("<i2")}
SPEECH_SECONDS = 6.0

ENDPOINT = web.AppKey("engine_endpoint", str)
KEYS = web.AppKey("engine_keys", object)
TIMEOUT = web.AppKey("engine_timeout", float)
CACHE_DIR = web.AppKey("cache_dir", Path)
PEERS = web.AppKey("webrtc_peers", dict)
API_CLIENT = web.AppKey("api_client", dict)
SESSIONS = web.AppKey("sessions", set)
SPEECH_LOCK = web.AppKey("speech_lock", asyncio.Lock)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lipsync-engine" / "web"


def pack_frame(meta: dict[str, Any], jpeg: bytes) -> bytes:
    """The binary frame message: ``<u32 len><len bytes of JSON><JPEG>``."""
    blob = json.dumps(meta, separators=(",", ":")).encode()
    return struct.pack("<I", len(blob)) + blob + jpeg


def unpack_frame(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Inverse of :func:`pack_frame` (for clients and tests)."""
    (n,) = struct.unpack_from("<I", data, 0)
    return json.loads(data[4:4 + n]), data[4 + n:]


# --------------------------------------------------------------------------------------------
# WebSocket session
# --------------------------------------------------------------------------------------------


class _BadRequest(Exception):
    pass


class _Session:
    """One browser connection: at most one engine stream at a time."""

    def __init__(self, ws: web.WebSocketResponse, endpoint: str, timeout: float,
                 keys: ClientKeys | None = None) -> None:
        self.ws = ws
        self.endpoint = endpoint
        self.keys = keys
        self.timeout = timeout
        self.client: AsyncClient | None = None
        self.stream: AsyncStream | None = None
        self.pump: asyncio.Task | None = None
        self.dtype = PCM_FORMATS["f32"]
        self.audio_ended = False
        self._send_lock = asyncio.Lock()

    # -- sending -----------------------------------------------------------------------------------
    async def send_json(self, obj: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        async with self._send_lock:
            await self.ws.send_str(json.dumps(obj, separators=(",", ":")))

    async def send_bytes(self, data: bytes) -> None:
        if self.ws.closed:
            raise ConnectionResetError("the WebSocket is closed")
        async with self._send_lock:
            await self.ws.send_bytes(data)

    async def error(self, code: str, message: str) -> None:
        await self.send_json({"type": "error", "code": code, "message": message})

    # -- browser messages --------------------------------------------------------------------------
    async def on_text(self, data: str) -> None:
        try:
            msg = json.loads(data)
        except ValueError as e:
            raise _BadRequest(f"a text message must be JSON: {e}") from None
        if not isinstance(msg, dict):
            raise _BadRequest(f"a text message must be a JSON object, got {type(msg).__name__}")
        kind = msg.get("type")
        if kind == "open":
            await self.open(msg)
        elif kind == "end":
            await self.end()
        elif kind == "close":
            sid = self.stream.id if self.stream is not None else None
            await self.close_stream()
            await self.send_json({"type": "closed", "stream": sid})
        elif kind == "ping":
            await self.send_json({"type": "pong", "t": msg.get("t")})
        else:
            raise _BadRequest(f"unknown message type {kind!r} (open, end, close, ping)")

    async def open(self, msg: dict[str, Any]) -> None:
        if self.stream is not None:
            raise _BadRequest(f"stream {self.stream.id} is still open on this connection; "
                              "send {\"type\": \"close\"} first or wait for its end")
        avatar = msg.get("avatar")
        if not isinstance(avatar, str) or not avatar:
            raise _BadRequest("open: avatar must be a non-empty string")
        realtime = msg.get("realtime", True)
        idle_frames = msg.get("idle_frames", True)
        for key, v in (("realtime", realtime), ("idle_frames", idle_frames)):
            if not isinstance(v, bool):
                raise _BadRequest(f"open: {key} must be true or false, got {v!r}")
        start = msg.get("start_frame", 0)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise _BadRequest(f"open: start_frame must be an integer >= 0, got {start!r}")
        fmt = msg.get("format", "f32")
        if fmt not in PCM_FORMATS:
            raise _BadRequest(f"open: format must be one of {sorted(PCM_FORMATS)}, got {fmt!r}")
        if self.client is None:
            self.client = AsyncClient(self.endpoint, timeout=self.timeout, keys=self.keys)
        stream = await self.client.open_stream(avatar, realtime=realtime, start_frame=start,
                                               idle_frames=idle_frames)
        if self.ws.closed:                       # the browser left while the avatar was loading
            with contextlib.suppress(EngineError, asyncio.TimeoutError):
                await asyncio.wait_for(stream.close(), 5.0)
            return
        self.stream, self.dtype, self.audio_ended = stream, PCM_FORMATS[fmt], False
        self.pump = asyncio.get_running_loop().create_task(self._pump(stream))
        log.info("stream %s opened on %s (realtime %s, %s)", stream.id, avatar, realtime, fmt)
        await self.send_json({"type": "opened", "stream": stream.info, "format": fmt})

    async def on_binary(self, data: bytes) -> None:
        if self.stream is None:
            await self.error("no_stream", "audio before {\"type\": \"open\"} (or after the stream ended); "
                                          "open a stream first")
            return
        if self.audio_ended:
            await self.error("bad_request", "audio after {\"type\": \"end\"}")
            return
        if len(data) % self.dtype.itemsize:
            await self.error("bad_payload", f"{len(data)} bytes is not a whole number of "
                                            f"{self.dtype.itemsize}-byte samples")
            return
        if not data:
            return
        pcm = np.frombuffer(data, self.dtype).astype(self.dtype.newbyteorder("="), copy=False)
        stream = self.stream
        try:
            await stream.push(pcm)
        except EngineError as e:
            if self.stream is stream:            # else: the stream ended meanwhile and said so already
                await self.error(e.code, e.message)

    async def end(self) -> None:
        if self.stream is None:
            raise _BadRequest("end: no open stream")
        if self.audio_ended:
            return
        self.audio_ended = True
        stream = self.stream
        try:
            await stream.end()
        except EngineError as e:
            if self.stream is stream:
                await self.error(e.code, e.message)

    # -- engine frames -----------------------------------------------------------------------------
    async def _pump(self, stream: AsyncStream) -> None:
        count = 0
        try:
            async for f in stream.frames():
                meta = {"frame": f.number, "pts_ms": f.pts_ms, "late_ms": f.late_ms, "idle": f.idle,
                        "last": f.last, "avatar_frame": f.avatar_frame}
                await self.send_bytes(pack_frame(meta, f.jpeg))
                count += 1
            self._finished(stream)
            await self.send_json({"type": "end", "stream": stream.id, "frames": count})
        except StreamClosed as e:
            self._finished(stream)
            await self.send_json({"type": "error", "code": e.code, "message": e.message, "stream": stream.id})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the browser went away, or a bug: never the gateway's end
            self._finished(stream)
            log.debug("stream %s: frame pump stopped: %r", stream.id, e)

    def _finished(self, stream: AsyncStream) -> None:
        """The engine closed ``stream`` itself (last frame or an error event): nothing to close."""
        if self.stream is stream:
            self.stream = None
            self.pump = None

    async def close_stream(self) -> None:
        stream, pump = self.stream, self.pump
        self.stream = self.pump = None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        if stream is not None:
            with contextlib.suppress(EngineError, asyncio.TimeoutError):
                await asyncio.wait_for(stream.close(), 5.0)
            log.info("stream %s closed by the gateway", stream.id)

    async def shutdown(self) -> None:
        try:
            await self.close_stream()
        finally:
            if self.client is not None:
                self.client.close()
                self.client = None


# --------------------------------------------------------------------------------------------
# HTTP handlers
# --------------------------------------------------------------------------------------------


async def _ws_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_WS_MESSAGE, compress=False)
    await ws.prepare(request)
    session = _Session(ws, request.app[ENDPOINT], request.app[TIMEOUT], request.app[KEYS])
    request.app[SESSIONS].add(session)
    try:
        async for msg in ws:
            try:
                if msg.type == WSMsgType.TEXT:
                    await session.on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await session.on_binary(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    log.debug("WebSocket error: %r", ws.exception())
                    break
            except _BadRequest as e:
                await session.error("bad_request", str(e))
            except EngineError as e:
                await session.error(e.code, e.message)
            except (ConnectionResetError, asyncio.CancelledError):
                raise
            except Exception as e:  # noqa: BLE001
                log.exception("WebSocket message failed")
                await session.error("internal", f"gateway error: {e!r}")
    except ConnectionResetError:
        pass
    finally:
        request.app[SESSIONS].discard(session)
        await asyncio.shield(session.shutdown())
    return ws


def _api_client(app: web.Application) -> AsyncClient:
    holder = app[API_CLIENT]
    if "client" not in holder:
        holder["client"] = AsyncClient(app[ENDPOINT], timeout=min(app[TIMEOUT], 10.0), keys=app[KEYS])
    return holder["client"]


def _engine_failure(e: EngineError) -> web.Response:
    return web.json_response({"error": {"code": e.code, "message": e.message}}, status=502)


async def _avatars(request: web.Request) -> web.Response:
    try:
        models = await _api_client(request.app).models()
    except EngineError as e:
        return _engine_failure(e)
    avatars = [{"name": m["name"], "loaded": bool(m.get("loaded")), "state": m.get("state"),
                "frames": m.get("frames")} for m in models]
    return web.json_response({"engine": request.app[ENDPOINT], "avatars": avatars})


async def _health(request: web.Request) -> web.Response:
    try:
        return web.json_response(await _api_client(request.app).health())
    except EngineError as e:
        return _engine_failure(e)


_NO_CACHE = {"Cache-Control": "no-cache"}


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers=_NO_CACHE)


async def _speech_wav(app: web.Application) -> Path:
    path = app[CACHE_DIR] / "speech.wav"
    async with app[SPEECH_LOCK]:
        if not path.is_file():
            from engine.audio.speech import make_speech_wav
            await asyncio.get_running_loop().run_in_executor(None, make_speech_wav, path, SPEECH_SECONDS)
    return path


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name == "speech.wav":
        return web.FileResponse(await _speech_wav(request.app), headers=_NO_CACHE)
    root = STATIC_DIR.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise web.HTTPNotFound(text=f"no static file {name!r}")
    return web.FileResponse(path, headers=_NO_CACHE)


async def _webrtc_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "webrtc.html")


async def _offer(request: web.Request) -> web.StreamResponse:
    """``POST /api/offer``: a WebRTC viewer (frontends/web/webrtc.py; needs the ``webrtc`` extra)."""
    try:
        from frontends.web import webrtc
    except ImportError as e:
        return web.json_response({"error": {"code": "not_installed", "message": f"WebRTC needs aiortc: pip install "
                                            f"'lipsync-engine[webrtc]' ({e})"}}, status=501)
    app = request.app
    return await webrtc.offer(request, app[ENDPOINT], app[KEYS], app[TIMEOUT], app[PEERS])


async def _webrtc_summary(request: web.Request) -> web.StreamResponse:
    try:
        from frontends.web import webrtc
    except ImportError:
        return web.json_response({"sessions": []})
    return web.json_response(webrtc.summary(request.app[PEERS]))


async def _on_shutdown(app: web.Application) -> None:
    if app[PEERS]:
        from frontends.web import webrtc
        await webrtc.close_all(app[PEERS])
    for s in list(app[SESSIONS]):
        with contextlib.suppress(Exception):
            await s.ws.close(code=1001, message=b"gateway stopping")


async def _on_cleanup(app: web.Application) -> None:
    client = app[API_CLIENT].pop("client", None)
    if client is not None:
        client.close()


def make_app(engine_endpoint: str, *, timeout: float = 60.0, cache_dir: str | Path | None = None,
             keys: ClientKeys | None = None) -> web.Application:
    """The gateway application for the engine at ``engine_endpoint`` (its client ROUTER socket).

    ``timeout``: seconds an engine request may take (opening a stream loads its avatar);
    ``cache_dir``: where ``speech.wav`` is generated (default ``~/.cache/lipsync-engine/web``);
    ``keys``: the CURVE keys to connect with, for an engine with CURVE.
    """
    app = web.Application()
    app[ENDPOINT] = engine_endpoint
    app[KEYS] = keys
    app[TIMEOUT] = float(timeout)
    app[CACHE_DIR] = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    app[API_CLIENT] = {}
    app[SESSIONS] = set()
    app[SPEECH_LOCK] = asyncio.Lock()
    app.router.add_get("/", _index)
    app.router.add_get("/webrtc", _webrtc_page)
    app.router.add_get("/static/{name:.+}", _static)
    app.router.add_get("/api/avatars", _avatars)
    app.router.add_get("/api/health", _health)
    app.router.add_get("/ws", _ws_handler)
    app[PEERS] = {}
    app.router.add_post("/api/offer", _offer)
    app.router.add_get("/api/webrtc", _webrtc_summary)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m frontends.web.gateway",
                                 description="HTTP + WebSocket gateway: the browser player of the lip-sync engine.")
    ap.add_argument("--engine", default="tcp://127.0.0.1:5555", help="the engine's client endpoint (server.front)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds an engine request may take (default: 60)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where speech.wav is generated")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--server-key", type=Path, default=None,
                    help="the engine's public certificate (server.key), for an engine with CURVE")
    ap.add_argument("--client-key", type=Path, default=None,
                    help="the gateway's secret certificate (NAME.key_secret; NAME.key in the engine's server.curve_clients)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    keys = None
    if args.server_key or args.client_key:
        if not (args.server_key and args.client_key):
            ap.error("--server-key and --client-key go together")
        try:
            keys = ClientKeys.from_files(args.server_key, args.client_key)
        except CertificateError as e:
            ap.error(str(e))
    app = make_app(args.engine, timeout=args.timeout, cache_dir=args.cache_dir, keys=keys)
    print(f"gateway: http://{args.host}:{args.port}/ (engine {args.engine})", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
