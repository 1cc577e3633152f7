"""What the blocking and the asyncio clients share: errors, results, the handshake watch, and
the request and reply parts they build and read."""
from __future__ import annotations

import itertools

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from engine import protocol as P

if TYPE_CHECKING:
    from engine.client.aio import AsyncStream
    from engine.client.sync import Stream


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


WATCHED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)


_MONITORS = itertools.count()


class ConnectionWatch:
    """The client socket's connection events (handshakes, drops), read from its monitor without
    blocking (a socket has one monitor, so one watch serves both uses)."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, curve: bool) -> None:
        self.curve = curve
        # a counter, not id(sock): a socket collected without close can leave its monitor's address
        # bound while a new socket gets the same id ("Address already in use", seen in CI)
        addr = f"inproc://lse-client-monitor-{next(_MONITORS)}"
        sock.monitor(addr, WATCHED)
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
DISCONNECTED = P.Reply(None, "error", {}, {"code": "disconnected",
                                            "message": "the connection to the engine dropped: the stream is gone"},
                        [], "stream_error", None)


def event_frame(owner: Stream | AsyncStream, ev: P.Reply) -> StreamFrame | None:
    """A stream event as a frame; None at the stream's end; StreamClosed for an error event."""
    if ev.event in ("stream_error", "stream_end"):
        owner.finished = True
        if ev.event == "stream_end":
            return None
        err = ev.error or {}
        raise StreamClosed(err.get("code", "unknown"), err.get("message", ""))
    f = stream_frame(ev)
    owner.finished = owner.finished or f.last
    return f


def stream_frame(reply: P.Reply) -> StreamFrame:
    r = reply.result
    frame = reply.buffers[0][1]
    jpeg = bytes(frame.buffer if hasattr(frame, "buffer") else frame)
    return StreamFrame(r["frame"], r["pts_ms"], r["late_ms"], jpeg, r["last"], r.get("idle", False),
                       r.get("avatar_frame", -1))


def pcm_buffer(pcm: np.ndarray) -> list[tuple[str, np.ndarray]]:
    pcm = np.asarray(pcm)
    if pcm.dtype not in (np.int16, np.float32):
        pcm = pcm.astype(np.float32)
    return [("pcm", np.ascontiguousarray(pcm))]


def stream_params(model: str, realtime: bool, start_frame: int, wrap: str | None, idle_frames: bool) -> dict:
    params: dict[str, Any] = {"model": model, "sample_rate": 16000, "realtime": realtime,
                              "start_frame": start_frame, "idle_frames": idle_frames}
    if wrap is not None:
        params["wrap"] = wrap
    return params


def request_parts(req_id: int, method: str, params: dict[str, Any],
                   buffers: list[tuple[str, np.ndarray]] | None) -> list[Any]:
    return [b"", *P.encode_request(req_id, method, params, buffers)]


def batch_buffers(audio_features: np.ndarray, visual_frames: np.ndarray | None) -> list[tuple[str, np.ndarray]]:
    bufs = [("audio_features", np.ascontiguousarray(audio_features, np.float32))]
    if visual_frames is not None:
        bufs.append(("visual_frames", np.ascontiguousarray(visual_frames, np.float32)))
    return bufs


def batch_params(model: str, batch: int, start_frame: int, wrap: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"model": model, "batch_size": batch, "start_frame": start_frame}
    if wrap is not None:
        params["wrap"] = wrap
    return params


def unwrap(reply: P.Reply) -> P.Reply:
    if not reply.ok:
        err = reply.error or {}
        raise EngineError(err.get("code", "unknown"), err.get("message", ""))
    return reply


def composite_result(reply: P.Reply) -> CompositeResult:
    return CompositeResult([bytes(f.buffer if hasattr(f, "buffer") else f) for _, f in reply.buffers], reply.result)


def infer_result(reply: P.Reply) -> tuple[np.ndarray, dict[str, Any]]:
    desc, frame = reply.buffers[0]
    buf = frame.buffer if hasattr(frame, "buffer") else frame
    return np.frombuffer(buf, np.float32).reshape(desc["shape"]), reply.result
