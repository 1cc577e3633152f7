"""The engine's logs: their format (text or JSON lines, with the request a line is about), and the
log file: everything every engine process writes to stdout/stderr, size-bounded.

**Format.** ``server.log_format = "text"`` writes ``time level [role pid] logger: message``;
``"json"`` writes one JSON object per line: ``ts`` (UTC, ISO 8601 with milliseconds), ``level``,
``role``, ``pid``, ``logger``, ``msg``, and ``exc`` (the traceback) when there is one. A line
written while the front handles a request carries the request: ``request_id`` (the ``id`` the
client sent), ``client`` (its CURVE key's name, or its connection's routing identity in hex) and
``method``; in text they are appended as ``[client=... id=... method]``. The front marks its
handlers with :func:`request_scope` and names the request with :func:`set_request`; a context
variable carries it to every log call underneath, so no log call has to pass it.

The supervisor points its own stdout and stderr at a pipe before it spawns anything; every child
inherits them, so Python logging, tracebacks and what native libraries (ONNX Runtime, CUDA) print
all arrive in that one pipe. A thread of the supervisor copies the pipe into ``server.log_file``,
starting a new file at ``server.log_max_bytes`` (at a line boundary) and keeping
``server.log_backups`` old ones (``engine.log.1`` the newest), so no client, however hostile, can
fill the disk through the log.
"""
from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

_request: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("lse_request", default=None)
REQUEST_FIELDS = ("request_id", "client", "method")


def set_request(request_id: Any, client: str, method: str) -> None:
    """The request the current handler is about (inside a :func:`request_scope`)."""
    _request.set({"request_id": request_id, "client": client, "method": method})


def request_scope(handler: Callable) -> Callable:
    """Decorate a front method: log lines inside it carry the request it handles. When its first
    argument is a request (``.method`` and ``.envelope``) or holds one (``.req``), that request;
    else the handler names it with :func:`set_request`. The previous value is restored after."""
    @functools.wraps(handler)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _request.set(None)
        try:
            first = args[0] if args else None
            req = getattr(first, "req", first)
            if req is not None and hasattr(req, "method") and hasattr(req, "envelope"):
                describe = getattr(self, "client_label", None)
                client = describe(req.envelope[0]) if describe else req.envelope[0].hex()
                set_request(req.id, client, req.method)
            return handler(self, *args, **kwargs)
        finally:
            _request.reset(token)
    return wrapper


class _RequestFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        current = _request.get()
        for key in REQUEST_FIELDS:
            if not hasattr(record, key):
                setattr(record, key, current.get(key) if current else None)
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)-5s [{role} %(process)d] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if getattr(record, "method", None) is not None:
            tail = f" [client={record.client} id={json.dumps(record.request_id)} {record.method}]"
            head, nl, rest = line.partition("\n")     # before a traceback, if any
            line = head + tail + nl + rest
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (a traceback is a field, never extra lines)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z",
            "level": record.levelname, "role": self.role, "pid": record.process, "logger": record.name,
            "msg": record.getMessage()}
        for key in REQUEST_FIELDS:
            value = getattr(record, key, None)
            if value is not None or (key == "request_id" and getattr(record, "method", None) is not None):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str)


def setup_logging(level: str, role: str, fmt: str = "text") -> None:
    """Every engine process's logging: to stderr, in ``server.log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else TextFormatter(role))
    handler.addFilter(_RequestFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


class RotatingWriter:
    """Append bytes to ``path``; when it would pass ``max_bytes``, rename it ``path.1`` (shifting
    older ones up to ``path.<backups>``, the oldest deleted) and start a new file."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "ab")
        self.size = self.fh.tell()

    def write(self, data: bytes) -> None:
        while data:
            room = self.max_bytes - self.size
            if len(data) <= room:
                self._put(data)
                return
            cut = data.rfind(b"\n", 0, max(room, 0)) + 1       # end the file at a line boundary
            if cut == 0 and self.size == 0:
                cut = room                                     # one line longer than a whole file
            if cut:
                self._put(data[:cut])
                data = data[cut:]
            self.rotate()

    def _put(self, data: bytes) -> None:
        self.fh.write(data)
        self.fh.flush()
        self.size += len(data)

    def rotate(self) -> None:
        self.fh.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self.fh = open(self.path, "ab")
        self.size = 0

    def reopen(self) -> None:
        """After a failed write (the file removed, the disk full): start on a fresh handle."""
        try:
            self.fh.close()
        except OSError:
            pass
        self.fh = open(self.path, "ab")
        self.size = self.fh.tell()

    def close(self) -> None:
        self.fh.close()


def redirect_std_to(path: Path, max_bytes: int, backups: int) -> threading.Thread:
    """Point fds 1 and 2 of this process (and of every child it spawns later) at a pipe copied
    into a :class:`RotatingWriter` by a daemon thread; returns the thread."""
    writer = RotatingWriter(path, max_bytes, backups)
    r, w = os.pipe()
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        # never stop draining: a pipe nobody reads would block every process that logs
        lost = 0
        with os.fdopen(r, "rb", buffering=0) as pipe:
            while True:
                data = pipe.read(65536)
                if not data:
                    break
                try:
                    if lost:
                        writer.write(f"[log] {lost} bytes of log lost: the log file could not be written\n".encode())
                        lost = 0
                    writer.write(data)
                except OSError:
                    lost += len(data)              # disk full, file removed: count, reopen next time
                    try:
                        writer.reopen()
                    except OSError:
                        pass
        try:
            writer.close()
        except OSError:
            pass

    t = threading.Thread(target=pump, name="log-pump", daemon=True)
    t.start()
    return t


def end_redirect(pump: threading.Thread, timeout: float = 2.0) -> None:
    """At exit: close this process's ends of the pipe (fds 1 and 2 onto /dev/null) so the pump
    reads to the end, and wait for it to write the last lines."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    pump.join(timeout)
