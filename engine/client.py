"""Python clients of the engine's front: blocking (:class:`Client`) and asyncio (:class:`AsyncClient`).

Both speak protocol version 1 through a DEALER socket, so many requests can be in flight on one
connection; replies are matched to requests by ``id``.

With ``keys`` (:class:`engine.runtime.keys.ClientKeys`) the socket is a CURVE client: encrypted, and
authenticated by the engine's key allow-list (``docs/protocol.md``, "Security"). A refused client
gets no reply at all, so each client watches its own handshakes on a socket monitor: when the
engine refuses its key it raises :class:`EngineRefused` at once, and a timeout says when the
handshake failed (a wrong server key, or CURVE on one side only).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from engine import protocol as P
from engine.runtime.keys import ClientKeys


class EngineError(Exception):
    """An error reply: ``code`` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class EngineTimeout(EngineError):
    def __init__(self, seconds: float, why: str = "") -> None:
        super().__init__("timeout", f"no reply within {seconds} s" + (f"; {why}" if why else ""))


class Disconnected(EngineError):
    """The connection to the engine dropped (the engine restarted, or the network failed) before
    the reply came: the request is lost. Requests have no side effects, so sending it again is safe.
    A local code: never on the wire."""

    def __init__(self) -> None:
        super().__init__("disconnected", "the connection to the engine dropped before the reply came; "
                         "requests sent before are lost (send them again)")


class EngineRefused(EngineError):
    """The engine refused this client's CURVE key (not in its allow-list). A local code: never on the wire."""

    def __init__(self) -> None:
        super().__init__("refused", "the engine refused this client's CURVE key (its public key is not in the "
                         "engine's server.curve_clients folder)")


_WATCHED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)


class _ConnectionWatch:
    """The client socket's connection events (handshakes, drops), read from its monitor without
    blocking (a socket has one monitor, so one watch serves both uses)."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, curve: bool) -> None:
        self.curve = curve
        addr = f"inproc://lse-client-monitor-{id(sock):x}"
        sock.monitor(addr, _WATCHED)
        self.mon = ctx.socket(zmq.PAIR)
        self.mon.setsockopt(zmq.LINGER, 0)
        self.mon.connect(addr)
        self.refused = False
        self.connected = False                  # a handshake succeeded and no drop came since
        self.failed = 0                         # handshakes failed since the last one that succeeded

    def check(self) -> bool:
        """Raise EngineRefused once the engine has refused the key; else whether the connection
        dropped since the last check (what was sent on it is lost)."""
        dropped = False
        while True:
            try:
                event = int(parse_monitor_message(self.mon.recv_multipart(zmq.NOBLOCK))["event"])
            except zmq.Again:
                break
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failed = 0
                self.connected = True
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.refused = True
            elif event == zmq.EVENT_DISCONNECTED:
                # only a connection that completed its handshake can have carried (and lost) requests;
                # what waits for a failed one stays queued for the next attempt
                dropped = dropped or self.connected
                self.connected = False
            else:
                self.failed += 1
        if self.refused:
            raise EngineRefused()
        return dropped

    def why(self) -> str:
        if not self.failed:
            return ""
        if self.curve:
            return (f"the CURVE handshake with the engine failed {self.failed} time(s): a wrong server public key, "
                    "or the engine does not use CURVE")
        return (f"the handshake with the engine failed {self.failed} time(s): the engine requires CURVE "
                "(give the client keys)")

    def close(self, sock: zmq.Socket) -> None:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.mon.close(0)


@dataclass
class CompositeResult:
    frames: list[bytes]                  # JPEG, one per batch frame
    info: dict[str, Any]                 # timings, gpu_id, frame_indices, width, height ...


@dataclass
class StreamFrame:
    """One frame of a stream, in order: ``number`` counts from 0, ``pts_ms`` = number x 40."""
    number: int
    pts_ms: int
    late_ms: float
    jpeg: bytes
    last: bool
    idle: bool
    avatar_frame: int


class StreamClosed(EngineError):
    """The stream ended with an error event (timeout, worker died, engine stopping), or the
    connection it belonged to dropped (code ``disconnected``)."""


# a stream's marker event when its connection dropped (never on the wire)
_DISCONNECTED = P.Reply(None, "error", {}, {"code": "disconnected",
                                            "message": "the connection to the engine dropped: the stream is gone"},
                        [], "stream_error", None)


def _event_frame(owner: Stream | AsyncStream, ev: P.Reply) -> StreamFrame | None:
    """A stream event as a frame; None at the stream's end; StreamClosed for an error event."""
    if ev.event in ("stream_error", "stream_end"):
        owner.finished = True
        if ev.event == "stream_end":
            return None
        err = ev.error or {}
        raise StreamClosed(err.get("code", "unknown"), err.get("message", ""))
    f = _stream_frame(ev)
    owner.finished = owner.finished or f.last
    return f


def _stream_frame(reply: P.Reply) -> StreamFrame:
    r = reply.result
    frame = reply.buffers[0][1]
    jpeg = bytes(frame.buffer if hasattr(frame, "buffer") else frame)
    return StreamFrame(r["frame"], r["pts_ms"], r["late_ms"], jpeg, r["last"], r.get("idle", False),
                       r.get("avatar_frame", -1))


def _pcm_buffer(pcm: np.ndarray) -> list[tuple[str, np.ndarray]]:
    pcm = np.asarray(pcm)
    if pcm.dtype not in (np.int16, np.float32):
        pcm = pcm.astype(np.float32)
    return [("pcm", np.ascontiguousarray(pcm))]


def _stream_params(model: str, realtime: bool, start_frame: int, wrap: str | None, idle_frames: bool) -> dict:
    params: dict[str, Any] = {"model": model, "sample_rate": 16000, "realtime": realtime,
                              "start_frame": start_frame, "idle_frames": idle_frames}
    if wrap is not None:
        params["wrap"] = wrap
    return params


def _request_parts(req_id: int, method: str, params: dict[str, Any],
                   buffers: list[tuple[str, np.ndarray]] | None) -> list[Any]:
    return [b"", *P.encode_request(req_id, method, params, buffers)]


def _batch_buffers(audio_features: np.ndarray, visual_frames: np.ndarray | None) -> list[tuple[str, np.ndarray]]:
    bufs = [("audio_features", np.ascontiguousarray(audio_features, np.float32))]
    if visual_frames is not None:
        bufs.append(("visual_frames", np.ascontiguousarray(visual_frames, np.float32)))
    return bufs


def _batch_params(model: str, batch: int, start_frame: int, wrap: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"model": model, "batch_size": batch, "start_frame": start_frame}
    if wrap is not None:
        params["wrap"] = wrap
    return params


def _unwrap(reply: P.Reply) -> P.Reply:
    if not reply.ok:
        err = reply.error or {}
        raise EngineError(err.get("code", "unknown"), err.get("message", ""))
    return reply


def _composite_result(reply: P.Reply) -> CompositeResult:
    return CompositeResult([bytes(f.buffer if hasattr(f, "buffer") else f) for _, f in reply.buffers], reply.result)


def _infer_result(reply: P.Reply) -> tuple[np.ndarray, dict[str, Any]]:
    desc, frame = reply.buffers[0]
    buf = frame.buffer if hasattr(frame, "buffer") else frame
    return np.frombuffer(buf, np.float32).reshape(desc["shape"]), reply.result


class Client:
    """Blocking client. ``submit``/``receive`` pipeline; the named methods wait for their reply."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", timeout: float = 120.0,
                 ctx: zmq.Context | None = None, keys: ClientKeys | None = None,
                 sockopts: dict[int, Any] | None = None) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        for opt, value in (sockopts or {}).items():      # e.g. {zmq.RCVHWM: 10}, set before connecting
            self.sock.setsockopt(opt, value)
        if keys is not None:
            keys.apply(self.sock)
        self.watch = _ConnectionWatch(self.ctx, self.sock, keys is not None)
        self.sock.connect(endpoint)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._stash: dict[Any, P.Reply] = {}
        self._events: dict[str, deque[P.Reply]] = {}
        self._sent: set[Any] = set()              # ids sent on the current connection, not answered yet
        self._lost: set[Any] = set()              # ids whose connection dropped before their reply
        self._dead: set[Any] = set()              # of those, ids already failed: a late reply is dropped

    def close(self) -> None:
        self.watch.close(self.sock)
        self.sock.close(0)

    def _check_connection(self) -> None:
        """EngineRefused when the engine refused the key. A dropped connection loses every reply
        and event of what was sent on it (the engine forgets a connection when it goes; ZeroMQ
        reconnects with a new identity): those requests and streams fail with ``disconnected``."""
        if self.watch.check():
            self._lost |= self._sent
            self._sent.clear()
            for q in self._events.values():
                q.append(_DISCONNECTED)

    def _poll(self, deadline: float, seconds: float) -> bool:
        """Whether a message is there, waiting at most 0.1 s at a time (the monitor is checked
        between); EngineTimeout once ``deadline`` has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            self.watch.check()
            raise EngineTimeout(seconds, self.watch.why())
        return bool(self.sock.poll(int(1000 * min(left, 0.1)) + 1))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def submit(self, method: str, params: dict[str, Any] | None = None,
               buffers: list[tuple[str, np.ndarray]] | None = None) -> int:
        self._check_connection()
        req_id = next(self._ids)
        self.sock.send_multipart(_request_parts(req_id, method, params or {}, buffers), copy=False)
        self._sent.add(req_id)
        return req_id

    def receive(self, req_id: Any = None, timeout: float | None = None) -> P.Reply:
        """The reply to ``req_id`` (or the next reply of any id when None). Raises EngineTimeout,
        or Disconnected (code ``disconnected``) when the connection dropped before the reply came."""
        if req_id is not None and req_id in self._stash:
            return self._stash.pop(req_id)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            self._check_connection()
            if req_id in self._lost:
                self._lost.discard(req_id)
                self._dead.add(req_id)
                raise Disconnected()
            if not self._poll(deadline, wait):
                continue
            reply = self._recv()
            if reply.event is not None:
                self._events.setdefault(reply.stream, deque()).append(reply)
                continue
            if reply.id in self._dead:            # the late reply of a request already failed: dropped
                self._dead.discard(reply.id)
                continue
            self._lost.discard(reply.id)          # it was not lost after all (it waited in the socket)
            self._sent.discard(reply.id)
            if req_id is None or reply.id == req_id:
                return reply
            self._stash[reply.id] = reply

    def _recv(self) -> P.Reply:
        frames = self.sock.recv_multipart(copy=False)
        body = frames[1:] if frames and len(frames[0].buffer) == 0 else frames
        return P.parse_reply(body)

    def next_event(self, stream: str, timeout: float | None = None) -> P.Reply:
        """The next event (frame, stream_end, stream_error) of ``stream``, replies stashed meanwhile."""
        q = self._events.setdefault(stream, deque())
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            self._check_connection()
            if q:
                return q.popleft()
            if self._poll(deadline, wait):
                self._take_one()

    def _take_one(self) -> None:
        """Read one message: an event to its stream's queue, a reply to the stash."""
        reply = self._recv()
        if reply.event is not None:
            self._events.setdefault(reply.stream, deque()).append(reply)
        elif reply.id in self._dead:
            self._dead.discard(reply.id)
        else:
            self._lost.discard(reply.id)
            self._sent.discard(reply.id)
            self._stash[reply.id] = reply

    def wait_events(self, seconds: float) -> None:
        """Read what arrives for ``seconds`` (events queued for their streams, replies stashed)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._check_connection()
            if self.sock.poll(int(1000 * max(0.0, min(deadline - time.monotonic(), 0.1))) + 1):
                self._take_one()

    def open_stream(self, model: str, realtime: bool = True, start_frame: int = 0, wrap: str | None = None,
                    idle_frames: bool = True) -> Stream:
        """Open a stream: push 16 kHz mono PCM as it comes, iterate the frames in order."""
        result = self.call("stream_open", _stream_params(model, realtime, start_frame, wrap, idle_frames)).result
        self._events.setdefault(result["stream"], deque())     # a dropped connection marks it there
        return Stream(self, result["stream"], result)

    def call(self, method: str, params: dict[str, Any] | None = None,
             buffers: list[tuple[str, np.ndarray]] | None = None, timeout: float | None = None) -> P.Reply:
        return _unwrap(self.receive(self.submit(method, params, buffers), timeout))

    def composite(self, model: str, audio_features: np.ndarray, visual_frames: np.ndarray | None = None,
                  start_frame: int = 0, wrap: str | None = None) -> CompositeResult:
        reply = self.call("composite", _batch_params(model, len(audio_features), start_frame, wrap),
                          _batch_buffers(audio_features, visual_frames))
        return _composite_result(reply)

    def infer(self, model: str, audio_features: np.ndarray, visual_frames: np.ndarray | None = None,
              start_frame: int = 0, wrap: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        reply = self.call("infer", _batch_params(model, len(audio_features), start_frame, wrap),
                          _batch_buffers(audio_features, visual_frames))
        return _infer_result(reply)

    def health(self) -> dict[str, Any]:
        return self.call("health").result

    def models(self) -> list[dict[str, Any]]:
        return self.call("models").result["models"]

    def load(self, model: str, timeout: float | None = None) -> dict[str, Any]:
        return self.call("load", {"model": model}, timeout=timeout).result

    def unload(self, model: str) -> dict[str, Any]:
        return self.call("unload", {"model": model}).result


class Stream:
    """A stream opened by :meth:`Client.open_stream` (one thread uses it, like the client)."""

    def __init__(self, client: Client, stream_id: str, info: dict[str, Any]) -> None:
        self.client = client
        self.id = stream_id
        self.info = info
        self.ended = False
        self.finished = False                 # the last frame (or an error event) arrived: the engine closed it

    def push(self, pcm: np.ndarray, end: bool = False, wait: bool = True) -> dict[str, Any]:
        """Send audio (float32 in [-1, 1] or int16, 16 kHz mono); ``end`` marks the last chunk.

        The engine holds at most ``streams.max_audio_ahead_s`` of a stream's audio ahead of the
        frames it has delivered and answers ``busy`` beyond that. With ``wait`` (default) this
        waits and sends the chunk again until it is taken (or the client's timeout passes), so a
        producer faster than real time is slowed to the stream's pace; frames arriving meanwhile
        are kept for :meth:`frames`/:meth:`poll`."""
        deadline = time.monotonic() + self.client.timeout
        delay = 0.02
        while True:
            try:
                result = self.client.call("stream_audio", {"stream": self.id, "end": end}, _pcm_buffer(pcm)).result
                break
            except EngineError as e:
                if e.code != "busy" or not wait or time.monotonic() + delay > deadline:
                    raise
            self.client.wait_events(delay)
            delay = min(0.25, 2 * delay)
        self.ended = self.ended or end
        return result

    def end(self) -> dict[str, Any]:
        return self.push(np.zeros(0, np.float32), end=True)

    def poll(self, timeout: float = 0.0) -> list[StreamFrame]:
        """Frames that have arrived (waiting at most ``timeout`` for the first)."""
        out: list[StreamFrame] = []
        try:
            while not self.finished:
                f = _event_frame(self, self.client.next_event(self.id, timeout if not out else 0.0))
                if f is None:
                    break
                out.append(f)
        except EngineTimeout:
            pass
        return out

    def frames(self, timeout: float | None = None) -> Iterator[StreamFrame]:
        """Every frame in order until the last one (after :meth:`end`); StreamClosed on an error event."""
        while True:
            f = _event_frame(self, self.client.next_event(self.id, timeout))
            if f is None:
                return
            yield f
            if f.last:
                return

    def close(self) -> dict[str, Any]:
        """Close the stream (a no-op once the engine has ended it)."""
        if self.finished:
            return {"stream": self.id, "closed_by_engine": True}
        return self.client.call("stream_close", {"stream": self.id}).result


class AsyncClient:
    """asyncio client: every method is a coroutine; any number may be awaited concurrently."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", timeout: float = 120.0,
                 keys: ClientKeys | None = None) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(self.sock)
        self.watch = _ConnectionWatch(zmq.Context.shadow(self.ctx.underlying), self.sock, keys is not None)
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
        await self.sock.send_multipart(_request_parts(req_id, method, params or {}, buffers), copy=False)
        deadline = time.monotonic() + self.timeout
        try:
            while True:                          # check the connection every 0.1 s while waiting
                self._check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EngineTimeout(self.timeout, self.watch.why())
                try:
                    reply = await asyncio.wait_for(asyncio.shield(fut), min(left, 0.1))
                    break
                except asyncio.TimeoutError:
                    continue
        except BaseException:
            self._waiting.pop(req_id, None)
            fut.cancel()
            raise
        return _unwrap(reply)

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
                q.put_nowait(_DISCONNECTED)

    async def composite(self, model: str, audio_features: np.ndarray, visual_frames: np.ndarray | None = None,
                        start_frame: int = 0, wrap: str | None = None) -> CompositeResult:
        reply = await self.call("composite", _batch_params(model, len(audio_features), start_frame, wrap),
                                _batch_buffers(audio_features, visual_frames))
        return _composite_result(reply)

    async def infer(self, model: str, audio_features: np.ndarray, visual_frames: np.ndarray | None = None,
                    start_frame: int = 0, wrap: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        reply = await self.call("infer", _batch_params(model, len(audio_features), start_frame, wrap),
                                _batch_buffers(audio_features, visual_frames))
        return _infer_result(reply)

    async def health(self) -> dict[str, Any]:
        return (await self.call("health")).result

    async def models(self) -> list[dict[str, Any]]:
        return (await self.call("models")).result["models"]

    async def open_stream(self, model: str, realtime: bool = True, start_frame: int = 0, wrap: str | None = None,
                          idle_frames: bool = True) -> AsyncStream:
        result = (await self.call("stream_open", _stream_params(model, realtime, start_frame, wrap,
                                                                 idle_frames))).result
        self._events.setdefault(result["stream"], asyncio.Queue())
        return AsyncStream(self, result["stream"], result)

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
                                               _pcm_buffer(pcm))).result
            except EngineError as e:
                if e.code != "busy" or not wait or loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(0.25, 2 * delay)

    async def end(self) -> dict[str, Any]:
        return await self.push(np.zeros(0, np.float32), end=True)

    async def frames(self) -> AsyncIterator[StreamFrame]:
        q = self.client._events.setdefault(self.id, asyncio.Queue())
        while True:
            try:
                ev = await asyncio.wait_for(q.get(), 0.1)
            except asyncio.TimeoutError:
                self.client._check()                 # a dropped connection ends the stream
                continue
            f = _event_frame(self, ev)
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
