"""The blocking client: :class:`Client` and its :class:`Stream`."""
from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
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
        self.watch = ConnectionWatch(self.ctx, self.sock, keys is not None)
        self.sock.connect(endpoint)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._stash: dict[Any, P.Reply] = {}
        self._events: dict[str, deque[P.Reply]] = {}
        self._sent: set[Any] = set()              # ids sent on the current connection, not answered yet
        self._lost: set[Any] = set()              # ids whose connection dropped before their reply
        self._dead: set[Any] = set()              # of those, ids already failed: a late reply is dropped

    @classmethod
    def for_avatar(cls, cluster: str, avatar: str, *, resolve_timeout: float = 5.0, **kwargs: Any) -> Client:
        """A client of the engine a cluster's router (``engine-ctl cluster``) picks for ``avatar``:
        ``cluster`` is its resolve URL (e.g. ``http://127.0.0.1:8001/lse``); ``kwargs`` as for the
        constructor. With ``keys``, the server key the cluster names for that engine is used.
        :class:`engine.client.resolve.ResolveError` when the cluster cannot name one."""
        from engine.client.resolve import with_server_key
        endpoint, kwargs = with_server_key(cluster, avatar, resolve_timeout, kwargs)
        client = cls(endpoint, **kwargs)
        client.resolved = endpoint
        return client

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
                q.append(DISCONNECTED)

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
        parts = request_parts(req_id, method, params or {}, buffers)
        deadline = time.monotonic() + self.timeout
        while True:
            # never a blocking send: a DEALER with no connection (a handshake that failed for good, as a
            # plain-text client against CURVE) would wait in it for ever
            try:
                self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.watch.check()
                    why = self.watch.why()
                    raise EngineTimeout(self.timeout, "the request could not be sent: no connection to the engine"
                                        + (f"; {why}" if why else "")) from None
                self.sock.poll(int(1000 * min(left, 0.1)) + 1, zmq.POLLOUT)
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
        result = self.call("stream_open", stream_params(model, realtime, start_frame, wrap, idle_frames)).result
        self._events.setdefault(result["stream"], deque())     # a dropped connection marks it there
        return Stream(self, result["stream"], result)

    def call(self, method: str, params: dict[str, Any] | None = None,
             buffers: list[tuple[str, np.ndarray]] | None = None, timeout: float | None = None) -> P.Reply:
        return unwrap(self.receive(self.submit(method, params, buffers), timeout))

    def composite(self, model: str, audio_features: np.ndarray, visual_frames: np.ndarray | None = None,
                  start_frame: int = 0, wrap: str | None = None) -> CompositeResult:
        reply = self.call("composite", batch_params(model, len(audio_features), start_frame, wrap),
                          batch_buffers(audio_features, visual_frames))
        return composite_result(reply)

    def infer(self, model: str, audio_features: np.ndarray, visual_frames: np.ndarray | None = None,
              start_frame: int = 0, wrap: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        reply = self.call("infer", batch_params(model, len(audio_features), start_frame, wrap),
                          batch_buffers(audio_features, visual_frames))
        return infer_result(reply)

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
                result = self.client.call("stream_audio", {"stream": self.id, "end": end}, pcm_buffer(pcm)).result
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

    def flush(self) -> dict[str, Any]:
        """Barge-in (the listener interrupted): the engine drops the audio and the frames it has
        not sent and shows idle frames from the next frame on until audio is pushed again. Frames
        already received stay received. Result: ``frames_dropped``, ``audio_dropped_s``, ``next_frame``."""
        return self.client.call("stream_flush", {"stream": self.id}).result

    def poll(self, timeout: float = 0.0) -> list[StreamFrame]:
        """Frames that have arrived (waiting at most ``timeout`` for the first)."""
        out: list[StreamFrame] = []
        try:
            while not self.finished:
                f = event_frame(self, self.client.next_event(self.id, timeout if not out else 0.0))
                if f is None:
                    break
                out.append(f)
        except EngineTimeout:
            pass
        return out

    def frames(self, timeout: float | None = None) -> Iterator[StreamFrame]:
        """Every frame in order until the last one (after :meth:`end`); StreamClosed on an error event."""
        while True:
            f = event_frame(self, self.client.next_event(self.id, timeout))
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
