"""The wire protocol, version 1: the one module that reads and writes it (``docs/protocol.md``).

A message is a ZeroMQ multipart message::

    [routing envelope]  (ROUTER side only: the peer identity, then "" when the peer is a REQ socket)
    header              UTF-8 JSON object, at most 64 KiB
    buffer 0..n-1       raw bytes, one frame per entry of header["buffers"], in that order

Request header: ``{"v": 1, "id": <any JSON scalar>, "method": str, "params": {...},
"buffers": [{"name": str, "dtype": "float32", "shape": [int, ...]}, ...]}``.
Reply header: ``{"v": 1, "id": <the request's id>, "status": "ok", "result": {...},
"buffers": [...]}`` or ``{"v": 1, "id": ..., "status": "error", "error": {"code": str, "message": str}}``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

VERSION = 1
MAX_HEADER = 64 * 1024
MAX_FRAME = (1 << 53) - 1             # frame numbers stay exact in every client's JSON numbers
METHODS = ("composite", "infer", "health", "models", "load", "unload", "stream_open", "stream_audio", "stream_flush",
           "stream_close")
DTYPES = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2"), "uint8": np.dtype("u1")}

# error codes (docs/protocol.md, "Errors")
BAD_REQUEST = "bad_request"           # header malformed, a parameter missing or out of range
BAD_PAYLOAD = "bad_payload"           # a buffer of the wrong dtype, shape or size
UNKNOWN_METHOD = "unknown_method"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_MODEL = "unknown_model"
MODEL_ERROR = "model_error"           # the avatar's files could not be loaded or run
CAPACITY = "capacity"                 # the avatar does not fit the background budget
BUSY = "busy"                         # every ring and the pending queue are full
WORKER_DIED = "worker_died"           # the process holding the batch died; the request may be retried
SHUTTING_DOWN = "shutting_down"
UNKNOWN_STREAM = "unknown_stream"     # no open stream of that id on this connection
STREAM_TIMEOUT = "stream_timeout"     # (event) no audio for streams.idle_timeout_s
SLOW_CLIENT = "slow_client"           # (event) the client left too many bytes unread for too long
QUOTA_EXCEEDED = "quota_exceeded"     # the client key is over one of its quotas ([quotas], CURVE only)
INTERNAL = "internal"


class ProtocolError(Exception):
    """A request that gets an error reply; ``code`` is one of the codes above."""

    def __init__(self, code: str, message: str, req_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id


@dataclass
class Buffer:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Any                               # zmq.Frame, bytes or memoryview

    @property
    def nbytes(self) -> int:
        return memoryview(_bytes(self.data)).nbytes

    def array(self) -> np.ndarray:
        buf = _bytes(self.data)
        return np.frombuffer(buf, DTYPES[self.dtype]).reshape(self.shape)


@dataclass
class Request:
    envelope: list[Any]
    id: Any
    method: str
    params: dict[str, Any]
    buffers: dict[str, Buffer] = field(default_factory=dict)
    held: bool = False                      # counted against its connection until answered (the front's)
    t_recv: float = 0.0                     # when the front received it (its access log)


def _bytes(frame: Any) -> bytes | memoryview:
    return frame.buffer if hasattr(frame, "buffer") else frame


def split_envelope(frames: list[Any]) -> tuple[list[Any], list[Any]]:
    """ROUTER frames -> (envelope, body): the identity, plus the empty delimiter a REQ peer adds."""
    if not frames:
        raise ProtocolError(BAD_REQUEST, "empty message")
    n = 1
    if len(frames) > 1 and len(_bytes(frames[1])) == 0:
        n = 2
    return list(frames[:n]), list(frames[n:])


def parse_request(envelope: list[Any], body: list[Any]) -> Request:
    """Decode and structurally validate one request (method-specific checks are the front's)."""
    if not body:
        raise ProtocolError(BAD_REQUEST, "no header frame after the envelope")
    raw = bytes(_bytes(body[0]))
    if len(raw) > MAX_HEADER:
        raise ProtocolError(BAD_REQUEST, f"header is {len(raw)} bytes, more than {MAX_HEADER}")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:   # bad UTF-8 or JSON, NaN/Infinity, huge integers, deep nesting
        raise ProtocolError(BAD_REQUEST, f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(BAD_REQUEST, "header must be a JSON object")
    req_id = header.get("id")
    if isinstance(req_id, (dict, list)):
        raise ProtocolError(BAD_REQUEST, "id must be a string, a number or null")
    if _integer(header.get("v")) != VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, f"protocol version {header.get('v')!r} not supported; "
                            f"this engine speaks version {VERSION}", req_id)
    method = header.get("method")
    if not isinstance(method, str):
        raise ProtocolError(BAD_REQUEST, "method must be a string", req_id)
    if method not in METHODS:
        raise ProtocolError(UNKNOWN_METHOD, f"unknown method {method!r}; known: {', '.join(METHODS)}", req_id)
    params = header.get("params", {})
    if not isinstance(params, dict):
        raise ProtocolError(BAD_REQUEST, "params must be a JSON object", req_id)
    descs = header.get("buffers", [])
    if not isinstance(descs, list):
        raise ProtocolError(BAD_REQUEST, "buffers must be a list", req_id)
    payload = body[1:]
    if len(descs) != len(payload):
        raise ProtocolError(BAD_PAYLOAD, f"header lists {len(descs)} buffers but {len(payload)} binary frames "
                            "follow it", req_id)
    buffers: dict[str, Buffer] = {}
    for i, (desc, frame) in enumerate(zip(descs, payload)):
        buf = _parse_buffer(desc, frame, i, req_id)
        if buf.name in buffers:
            raise ProtocolError(BAD_PAYLOAD, f"buffer {buf.name!r} given twice", req_id)
        buffers[buf.name] = buf
    return Request(envelope, req_id, method, params, buffers)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} out of range")
    return value


def _parse_buffer(desc: Any, frame: Any, i: int, req_id: Any) -> Buffer:
    if not isinstance(desc, dict) or not isinstance(desc.get("name"), str):
        raise ProtocolError(BAD_PAYLOAD, f"buffers[{i}] must be an object with a name", req_id)
    name = desc["name"]
    dtype = desc.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(BAD_PAYLOAD, f"buffer {name!r}: dtype {dtype!r} not supported "
                            f"(expected one of {', '.join(DTYPES)})", req_id)
    shape = desc.get("shape")
    dims = [_integer(d) for d in shape] if isinstance(shape, list) else None
    if dims is None or any(d is None or d < 0 for d in dims):
        raise ProtocolError(BAD_PAYLOAD, f"buffer {name!r}: shape must be a list of non-negative integers", req_id)
    shape = dims
    size = len(_bytes(frame))
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if size != expected:
        raise ProtocolError(BAD_PAYLOAD, f"buffer {name!r}: {size} bytes, but {dtype} {shape} needs {expected}",
                            req_id)
    return Buffer(name, dtype, tuple(shape), frame)


def _integer(value: Any) -> int | None:
    """A JSON integer: any number with an integral value (``2`` and ``2.0`` alike, as JSON itself
    does not tell them apart); None for anything else, booleans included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def check_int(params: dict[str, Any], key: str, lo: int, hi: int | None, default: int | None = None,
              req_id: Any = None) -> int:
    value = params.get(key)
    if value is None:
        value = default
    if value is None:
        raise ProtocolError(BAD_REQUEST, f"params.{key} is required", req_id)
    number = _integer(value)
    if number is None or number < lo or (hi is not None and number > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ProtocolError(BAD_REQUEST, f"params.{key} must be an integer {rng}, got {value!r}", req_id)
    return number


def check_bool(params: dict[str, Any], key: str, default: bool, req_id: Any = None) -> bool:
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(BAD_REQUEST, f"params.{key} must be true or false, got {value!r}", req_id)
    return value


def check_str(params: dict[str, Any], key: str, choices: tuple[str, ...] | None = None,
              default: str | None = None, req_id: Any = None) -> str:
    value = params.get(key)
    if value is None:
        value = default
    if value is None:
        raise ProtocolError(BAD_REQUEST, f"params.{key} is required", req_id)
    if not isinstance(value, str) or value == "" or (choices is not None and value not in choices):
        expected = f"one of {', '.join(choices)}" if choices else "a non-empty string"
        raise ProtocolError(BAD_REQUEST, f"params.{key} must be {expected}, got {value!r}", req_id)
    return value


# -- encoding ------------------------------------------------------------------------------------
def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def encode_request(req_id: Any, method: str, params: dict[str, Any] | None = None,
                   buffers: list[tuple[str, np.ndarray]] | None = None) -> list[Any]:
    """Header + buffers for a request (a client prepends "" when it speaks through a DEALER)."""
    descs, frames = [], []
    for name, arr in buffers or []:
        dtype = next((k for k, v in DTYPES.items() if v == arr.dtype.newbyteorder("<")), None)
        if dtype is None:
            raise ValueError(f"{name}: dtype {arr.dtype} not supported by the protocol")
        arr = np.ascontiguousarray(arr, DTYPES[dtype])
        descs.append({"name": name, "dtype": dtype, "shape": list(arr.shape)})
        frames.append(memoryview(arr).cast("B") if arr.size else b"")
    header = {"v": VERSION, "id": req_id, "method": method, "params": params or {}, "buffers": descs}
    return [_dumps(header), *frames]


def ok_reply(req_id: Any, result: dict[str, Any], buffers: list[dict[str, Any]] | None = None) -> bytes:
    return _dumps({"v": VERSION, "id": req_id, "status": "ok", "result": result, "buffers": buffers or []})


def error_reply(req_id: Any, code: str, message: str) -> bytes:
    return _dumps({"v": VERSION, "id": req_id, "status": "error", "error": {"code": code, "message": message}})


def reply_code(header: bytes) -> str:
    """``"ok"`` or the error code of a reply header made by :func:`ok_reply`/:func:`error_reply`
    (for counting replies without decoding every one). Their keys come in the order v, id,
    status; the id is a JSON scalar, so the first unescaped ``,"status":"`` is the status key's."""
    i = header.find(b',"status":"')
    if header.startswith(b'ok"', i + 11):
        return "ok"
    try:
        return str(json.loads(header)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "invalid"


def event_message(event: str, stream: str, result: dict[str, Any] | None = None,
                  buffers: list[dict[str, Any]] | None = None, error: tuple[str, str] | None = None) -> bytes:
    """A message the engine sends without a request: a stream's frame, its end or its failure.
    Same shape as a reply (an error event has ``error`` and neither ``result`` nor ``buffers``)."""
    msg: dict[str, Any] = {"v": VERSION, "id": None, "event": event, "stream": stream}
    if error:
        msg.update(status="error", error={"code": error[0], "message": error[1]})
    else:
        msg.update(status="ok", result=result or {}, buffers=buffers or [])
    return _dumps(msg)


@dataclass
class Reply:
    id: Any
    status: str
    result: dict[str, Any]
    error: dict[str, str] | None
    buffers: list[tuple[dict[str, Any], Any]]
    event: str | None = None
    stream: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def parse_reply(body: list[Any]) -> Reply:
    """Decode a reply (client side); frames after the header are paired with their descriptors."""
    try:
        header = json.loads(bytes(_bytes(body[0])))
        descs = header.get("buffers", [])
        frames = body[1:]
        pairs: list[tuple[dict[str, Any], Any]] = []
        for d in descs:
            for _ in range(d.get("count", 1)):
                pairs.append((d, frames[len(pairs)]))
    except (IndexError, ValueError, AttributeError, TypeError) as e:
        raise ProtocolError(BAD_REQUEST, f"malformed reply: {e}") from None
    return Reply(header.get("id"), header.get("status", "error"), header.get("result") or {},
                 header.get("error"), pairs, header.get("event"), header.get("stream"))
