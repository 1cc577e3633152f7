"""A small asyncio client of the engine's wire protocol (docs/protocol.md, version 1), for streams
only: written from the protocol document, needing pyzmq and numpy, so the video service runs in a
voice agent's environment without the engine's own package (and its onnxruntime-gpu).

One DEALER socket (with the empty delimiter), requests matched to replies by id, a stream's events
(``frame``, ``stream_end``, ``stream_error``) put on that stream's queue.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio


class EngineError(Exception):
    """An error reply or event: ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass
class Frame:
    """One frame event: ``number`` counts from 0 (media time 40 x number ms)."""
    number: int
    jpeg: bytes
    idle: bool
    last: bool
    late_ms: float


def _z85_key(path: Path, which: str) -> bytes:
    """A key from a ZeroMQ certificate file (``public-key = "..."`` / ``secret-key = "..."``)."""
    for line in path.read_text().splitlines():
        k, _, v = line.strip().partition("=")
        if k.strip() == which:
            key = v.strip().strip('"').encode()
            if len(key) != 40:
                raise ValueError(f"{path}: its {which} is not a 40-character Z85 key")
            return key
    raise ValueError(f"{path}: no {which} in this certificate file")


class EngineClient:
    """Async client of one engine; ``keys`` = (server.key, NAME.key_secret) paths for CURVE."""

    def __init__(self, endpoint: str, timeout: float = 10.0, keys: tuple[Path, Path] | None = None) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            self._sock.curve_serverkey = _z85_key(Path(keys[0]), "public-key")
            self._sock.curve_publickey = _z85_key(Path(keys[1]), "public-key")
            self._sock.curve_secretkey = _z85_key(Path(keys[1]), "secret-key")
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.events: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self.broken: EngineError | None = None

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   pcm: np.ndarray | None = None) -> dict[str, Any]:
        if self.broken is not None:
            raise self.broken
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        rid = next(self._ids)
        header: dict[str, Any] = {"v": 1, "id": rid, "method": method, "params": params or {}, "buffers": []}
        parts = [b"", b""]
        if pcm is not None:
            pcm = np.ascontiguousarray(pcm, dtype="<f4")
            header["buffers"] = [{"name": "pcm", "dtype": "float32", "shape": [len(pcm)]}]
            parts.append(pcm.tobytes())
        parts[1] = json.dumps(header).encode()
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._sock.send_multipart(parts)
            reply = await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            raise EngineError("timeout", f"no reply to {method} within {self.timeout:g} s: is the engine running "
                                         f"at {self.endpoint}?") from None
        finally:
            self._pending.pop(rid, None)
        if reply.get("status") != "ok":
            err = reply.get("error") or {}
            raise EngineError(err.get("code", "internal"), err.get("message", "?"))
        return reply["result"]

    async def _read(self) -> None:
        """Replies to their requests, events to their streams' queues; a malformed message is skipped.
        When the socket fails, every waiting request and stream gets the error (nothing waits forever)."""
        try:
            while True:
                parts = await self._sock.recv_multipart()
                if parts and parts[0] == b"":
                    parts = parts[1:]
                try:
                    header = json.loads(parts[0])
                    if header.get("event"):
                        self.events.setdefault(str(header["stream"]), asyncio.Queue()).put_nowait((header, parts[1:]))
                        continue
                except (ValueError, IndexError, KeyError, AttributeError):
                    continue
                fut = self._pending.get(header.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(header)
        except zmq.ZMQError as e:
            self.broken = EngineError("disconnected", f"the connection to {self.endpoint} failed: {e}")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(self.broken)
            for q in self.events.values():
                q.put_nowait(({"event": "stream_error", "error": {"code": "disconnected",
                                                                  "message": str(self.broken)}}, []))

    async def open_stream(self, avatar: str) -> dict[str, Any]:
        result = await self.call("stream_open", {"model": avatar, "realtime": True})
        self.events.setdefault(result["stream"], asyncio.Queue())
        return result

    async def push(self, stream: str, pcm: np.ndarray) -> dict[str, Any]:
        return await self.call("stream_audio", {"stream": stream}, pcm)

    async def flush(self, stream: str) -> dict[str, Any]:
        return await self.call("stream_flush", {"stream": stream})

    async def close_stream(self, stream: str) -> None:
        with contextlib.suppress(EngineError):
            await self.call("stream_close", {"stream": stream})

    async def next_frame(self, stream: str) -> Frame | None:
        """The stream's next frame; None after its end; raises EngineError on a stream_error."""
        header, bufs = await self.events.setdefault(stream, asyncio.Queue()).get()
        if header["event"] == "stream_error":
            err = header.get("error") or {}
            raise EngineError(err.get("code", "internal"), err.get("message", "?"))
        if header["event"] != "frame":
            return None
        try:
            r = header["result"]
            return Frame(int(r["frame"]), bytes(bufs[0]), bool(r["idle"]), bool(r["last"]), float(r["late_ms"]))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise EngineError("bad_reply", f"a frame event this client cannot read: {e!r}") from None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._sock.close(0)
