"""The asyncio client: :class:`AsyncClient` and its :class:`AsyncStream`."""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from engine import protocol as P
from engine.client.common import (
    DISCONNECTED,
    CompositeResult,
    ConnectionWatch,
    Disconnected,
    EngineError,
    EngineTimeout,
    StreamFrame,
    batch_buffers,
    batch_params,
    composite_result,
    event_frame,
    infer_result,
    pcm_buffer,
    request_parts,
    stream_params,
    unwrap,
)
from engine.runtime.keys import ClientKeys


class AsyncClient:
    """asyncio client: every method is a coroutine; any number may be awaited concurrently."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", timeout: float = 120.0,
                 keys: ClientKeys | None = None) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(self.sock)
        self.watch = ConnectionWatch(zmq.Context.shadow(self.ctx.underlying), self.sock, keys is not None)
        self.sock.connect(endpoint)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._events: dict[str, asyncio.Queue] = {}

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            body = frames[1:] if frames and len(frames[0].buffer) == 0 else frames
            try:
                reply = P.parse_reply(body)
            except P.ProtocolError:
                continue                        # not a reply of this protocol: ignore it, keep reading
            if reply.event is not None:
                self._events.setdefault(reply.stream, asyncio.Queue()).put_nowait(reply)
                continue
            fut = self._waiting.pop(reply.id, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   buffers: list[tuple[str, np.ndarray]] | None = None) -> P.Reply:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        req_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = fut
        deadline = time.monotonic() + self.timeout
        try:                                     # bounded: with no connection, a send would wait for ever
            await asyncio.wait_for(self.sock.send_multipart(request_parts(req_id, method, params or {}, buffers),
                                                            copy=False), self.timeout)
        except asyncio.TimeoutError:
            self._waiting.pop(req_id, None)
            self._check()
            why = self.watch.why()
            raise EngineTimeout(self.timeout, "the request could not be sent: no connection to the engine"
                                + (f"; {why}" if why else "")) from None
        try:
            while True:                          # check the connection every 0.1 s while waiting
                self._check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EngineTimeout(self.timeout, self.watch.why())
                # asyncio.wait, not wait_for: under Python 3.11 a cancel that comes as wait_for's own
                # timeout fires can be lost, and this loop then went on until the deadline
                done, _ = await asyncio.wait((fut,), timeout=min(left, 0.1))
                if done:
                    reply = fut.result()
                    break
        except BaseException:
            self._waiting.pop(req_id, None)
            fut.cancel()
            raise
        return unwrap(reply)

    def _check(self) -> None:
        """EngineRefused when the engine refused the key; when the connection dropped, every
        request waiting on it fails with Disconnected and every stream gets a ``disconnected``
        error event."""
        if self.watch.check():
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(Disconnected())
            self._waiting.clear()
            for q in self._events.values():
                q.put_nowait(DISCONNECTED)

    async def composite(self, model: str, audio_features: np.ndarray, visual_frames: np.ndarray | None = None,
                        start_frame: int = 0, wrap: str | None = None) -> CompositeResult:
        reply = await self.call("composite", batch_params(model, len(audio_features), start_frame, wrap),
                                batch_buffers(audio_features, visual_frames))
        return composite_result(reply)

    async def infer(self, model: str, audio_features: np.ndarray, visual_frames: np.ndarray | None = None,
                    start_frame: int = 0, wrap: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        reply = await self.call("infer", batch_params(model, len(audio_features), start_frame, wrap),
                                batch_buffers(audio_features, visual_frames))
        return infer_result(reply)

    async def health(self) -> dict[str, Any]:
        return (await self.call("health")).result

    async def models(self) -> list[dict[str, Any]]:
        return (await self.call("models")).result["models"]

    async def open_stream(self, model: str, realtime: bool = True, start_frame: int = 0, wrap: str | None = None,
                          idle_frames: bool = True) -> AsyncStream:
        result = (await self.call("stream_open", stream_params(model, realtime, start_frame, wrap,
                                                                 idle_frames))).result
        self._events.setdefault(result["stream"], asyncio.Queue())
        return AsyncStream(self, result["stream"], result)

    @classmethod
    async def for_avatar(cls, cluster: str, avatar: str, *, resolve_timeout: float = 5.0,
                         **kwargs: Any) -> AsyncClient:
        """As :meth:`engine.client.Client.for_avatar`; the resolve call runs in a thread."""
        from engine.client.resolve import with_server_key
        endpoint, kwargs = await asyncio.to_thread(with_server_key, cluster, avatar, resolve_timeout, kwargs)
        client = cls(endpoint, **kwargs)
        client.resolved = endpoint
        return client

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.watch.close(self.sock)
        self.sock.close(0)


class AsyncStream:
    """A stream opened by :meth:`AsyncClient.open_stream`; push and iterate from different tasks."""

    def __init__(self, client: AsyncClient, stream_id: str, info: dict[str, Any]) -> None:
        self.client = client
        self.id = stream_id
        self.info = info
        self.finished = False

    async def push(self, pcm: np.ndarray, end: bool = False, wait: bool = True) -> dict[str, Any]:
        """As :meth:`Stream.push`: with ``wait``, a ``busy`` answer (the stream holds
        ``streams.max_audio_ahead_s`` of audio not played out yet) is retried until taken."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.client.timeout
        delay = 0.02
        while True:
            try:
                return (await self.client.call("stream_audio", {"stream": self.id, "end": end},
                                               pcm_buffer(pcm))).result
            except EngineError as e:
                if e.code != "busy" or not wait or loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(0.25, 2 * delay)

    async def end(self) -> dict[str, Any]:
        return await self.push(np.zeros(0, np.float32), end=True)

    async def flush(self) -> dict[str, Any]:
        """As :meth:`Stream.flush`: barge-in."""
        return (await self.client.call("stream_flush", {"stream": self.id})).result

    async def frames(self) -> AsyncIterator[StreamFrame]:
        q = self.client._events.setdefault(self.id, asyncio.Queue())
        while True:
            try:
                async with asyncio.timeout(0.1):     # not wait_for: it can lose a cancel (Python 3.11)
                    ev = await q.get()
            except TimeoutError:
                self.client._check()                 # a dropped connection ends the stream
                continue
            f = event_frame(self, ev)
            if f is None:
                return
            yield f
            if f.last:
                return

    async def close(self) -> dict[str, Any]:
        """Close the stream (a no-op once the engine has ended it)."""
        if self.finished:
            return {"stream": self.id, "closed_by_engine": True}
        return (await self.client.call("stream_close", {"stream": self.id})).result
