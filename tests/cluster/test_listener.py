"""The router's own resolve listener (engine.cluster.listener) without Ray: a handler served on a
port of its own from a running event loop, kept-alive connections, a taken port waited for and then
refused with a message naming it. The listener inside the router replica: tests/cluster/test_cluster.py."""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading

import pytest
from starlette.responses import JSONResponse

from engine.cluster.listener import Listener, bind
from engine.client.resolve import resolve


class Served:
    """A Listener on a loop in a thread, answering ``/lse/resolve`` as the router does."""

    def __init__(self, port: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.seen: list[str] = []
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def handler(request):
            self.seen.append(request.url.path + "?" + request.url.query)
            if request.url.path.endswith("/resolve"):
                name = request.query_params["avatar"]
                return JSONResponse({"avatar": name, "host": "h0", "endpoint": "tcp://127.0.0.1:1", "hot": True,
                                     "server_key": None})
            return JSONResponse({"error": "not_found", "message": request.url.path}, 404)

        async def start():
            return Listener(handler, "127.0.0.1", port)
        self.listener = asyncio.run_coroutine_threadsafe(start(), self.loop).result(15)
        self.url = f"http://127.0.0.1:{self.listener.port}/lse"

    def close(self) -> None:
        async def stop():
            self.listener.close()
            await asyncio.wait_for(self.listener.task, 10)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


def test_serves_the_handler_over_one_kept_alive_connection(served):
    conn = http.client.HTTPConnection("127.0.0.1", served.listener.port, timeout=5)
    try:
        for name in ("a", "b", "c"):
            conn.request("GET", f"/lse/resolve?avatar={name}")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["avatar"] == name
            assert not r.will_close
        conn.request("GET", "/lse/nothing")
        r = conn.getresponse()
        assert r.status == 404 and json.loads(r.read())["error"] == "not_found"
    finally:
        conn.close()
    assert resolve(served.url, "d")["avatar"] == "d"                     # the client's resolve() too
    assert served.seen[:3] == [f"/lse/resolve?avatar={n}" for n in "abc"]


def test_close_stops_it_and_frees_the_port():
    s = Served()
    port = s.listener.port
    s.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    again = Served(port)                                                 # the same port again
    try:
        assert resolve(again.url, "a")["avatar"] == "a"
    finally:
        again.close()


def test_a_taken_port_is_waited_for_then_refused_naming_it():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError) as e:
            bind("127.0.0.1", port, wait_s=0.3)
        assert f"127.0.0.1:{port}" in str(e.value) and "--resolve-port" in str(e.value)
        threading.Timer(0.3, taken.close).start()                        # freed while it waits: it binds
        sock = bind("127.0.0.1", port, wait_s=5)
        assert sock.getsockname()[1] == port
        sock.close()
    finally:
        taken.close()

