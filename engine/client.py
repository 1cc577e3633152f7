"""Python clients of the engine's front: blocking (:class:`Client`) and asyncio (:class:`AsyncClient`).

Both speak protocol version 1 through a DEALER socket, so many requests can be in flight on one
connection; replies are matched to requests by ``id``.
"""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from . import protocol as P


class EngineError(Exception):
    """An error reply: ``code`` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class EngineTimeout(EngineError):
    def __init__(self, seconds: float) -> None:
        super().__init__("timeout", f"no reply within {seconds} s")


@dataclass
class CompositeResult:
    frames: list[bytes]                  # JPEG, one per batch frame
    info: dict[str, Any]                 # timings, gpu_id, frame_indices, width, height ...


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
                 ctx: zmq.Context | None = None) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._stash: dict[Any, P.Reply] = {}

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def submit(self, method: str, params: dict[str, Any] | None = None,
               buffers: list[tuple[str, np.ndarray]] | None = None) -> int:
        req_id = next(self._ids)
        self.sock.send_multipart(_request_parts(req_id, method, params or {}, buffers), copy=False)
        return req_id

    def receive(self, req_id: Any = None, timeout: float | None = None) -> P.Reply:
        """The reply to ``req_id`` (or the next reply of any id when None)."""
        if req_id is not None and req_id in self._stash:
            return self._stash.pop(req_id)
        wait = self.timeout if timeout is None else timeout
        while True:
            if not self.sock.poll(int(wait * 1000)):
                raise EngineTimeout(wait)
            frames = self.sock.recv_multipart(copy=False)
            body = frames[1:] if frames and len(frames[0].buffer) == 0 else frames
            reply = P.parse_reply(body)
            if req_id is None or reply.id == req_id:
                return reply
            self._stash[reply.id] = reply

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


class AsyncClient:
    """asyncio client: every method is a coroutine; any number may be awaited concurrently."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", timeout: float = 120.0) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            body = frames[1:] if frames and len(frames[0].buffer) == 0 else frames
            reply = P.parse_reply(body)
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
        try:
            reply = await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            self._waiting.pop(req_id, None)
            raise EngineTimeout(self.timeout) from None
        return _unwrap(reply)

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

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(0)
