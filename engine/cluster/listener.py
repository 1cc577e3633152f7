"""The router's own HTTP listener: the resolve path without Serve's proxy.

Through Serve's HTTP proxy every request is an actor call from the proxy to the router replica and
back, a few milliseconds on a loaded host (docs/performance.md). The router replica also serves the
same routes itself on a port of its own (``--resolve-port``, 8001 by default), with uvicorn (which
Ray Serve ships) on the replica's own event loop, so a resolve is one HTTP exchange and the
router's ranking. The router runs on the Ray head node, so this URL is the head's address and that
port; Serve's proxy path (port 8000, on every node by default) stays for callers that cannot reach
the head.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from typing import Any, Awaitable, Callable

log = logging.getLogger("engine.cluster.listener")

BIND_WAIT_S = 3.0        # a replica that replaces another may start before the old one's socket is closed
KEEP_ALIVE_S = 75.0      # an idle kept-alive client connection is closed after this


def bind(host: str, port: int, wait_s: float = BIND_WAIT_S) -> socket.socket:
    """A listening TCP socket on ``host:port``, waiting up to ``wait_s`` while the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(512)
            sock.setblocking(False)
            return sock
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise OSError(e.errno, f"the router cannot listen on {host}:{port} for resolves: {e.strerror} "
                              "(another cluster's router? choose --resolve-port, or 0 for none)") from None
            time.sleep(0.1)


class Listener:
    """Serves ``handler`` (a Starlette request in, a Starlette response out) on ``host:port`` from
    the running event loop until :meth:`close`."""

    def __init__(self, handler: Callable[[Any], Awaitable[Any]], host: str, port: int) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):                 # the replica's signals stay Ray's
                yield

        async def app(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            from starlette.requests import Request
            response = await handler(Request(scope, receive))
            await response(scope, receive, send)

        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                            timeout_keep_alive=int(KEEP_ALIVE_S), server_header=False))
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the router's resolve listener on %s:%d stopped: %r", self.host, self.port, task.exception())

    def close(self) -> None:
        self.server.should_exit = True
