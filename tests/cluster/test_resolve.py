"""The client's resolve path (engine.client.resolve) against a small real HTTP server in a thread
that answers as the router does (or does not): the reply, ResolveError's codes, Client.for_avatar
connecting to the engine named (a real engine), and the server key of the reply replacing the
client's. The router itself behind Ray Serve: tests/cluster/test_cluster.py."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import zmq

from engine.client import AsyncClient, Client
from engine.client.resolve import ResolveError, resolve, with_server_key
from engine.runtime.keys import ClientKeys
from tests.conftest import free_port

SERVER_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


class Router:
    """A thread serving ``GET /lse/resolve?avatar=NAME`` from ``answers[NAME]`` = (status, content
    type, body bytes); records each request's path."""

    def __init__(self, keep_alive: bool = False) -> None:
        self.answers: dict[str, tuple[int, str, bytes]] = {}
        self.paths: list[str] = []
        self.peers: list[tuple[str, int]] = []             # each request's client address
        self.sockets: list = []                            # each connection's server side
        router = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                super().setup()
                router.sockets.append(self.connection)

            def do_GET(self) -> None:                      # noqa: N802 (http.server's name)
                router.paths.append(self.path)
                router.peers.append(self.client_address)
                url = urllib.parse.urlsplit(self.path)
                avatar = urllib.parse.parse_qs(url.query).get("avatar", [""])[0]
                if url.path != "/lse/resolve" or avatar not in router.answers:
                    status, ctype, body = 404, "text/plain", b"Path not found"
                else:
                    status, ctype, body = router.answers[avatar]
                if status == 0:                           # hang: never answer
                    time.sleep(5)
                    return
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/lse"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def json(self, avatar: str, status: int, body) -> None:
        self.answers[avatar] = (status, "application/json", json.dumps(body).encode())

    def drop_connections(self) -> None:
        """Close every client connection from the server's side, as an idle timeout does."""
        import socket
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def router():
    r = Router()
    yield r
    r.close()


def reply(endpoint: str, avatar: str = "a", server_key: str | None = None) -> dict:
    return {"avatar": avatar, "host": "h1", "endpoint": endpoint, "hot": True, "server_key": server_key}


def test_a_200_reply_is_the_dict_and_the_avatar_is_quoted(router):
    odd = "la dame & co/é"
    router.json(odd, 200, reply("tcp://10.0.0.2:5555", odd))
    assert resolve(router.url, odd) == reply("tcp://10.0.0.2:5555", odd)
    assert resolve(router.url + "/", odd)["endpoint"] == "tcp://10.0.0.2:5555"     # a trailing slash is fine
    assert len(router.paths) == 2 and all(p.startswith("/lse/resolve?avatar=") for p in router.paths)
    assert "&" not in router.paths[0].split("?", 1)[1]                              # one query parameter


def test_a_thread_keeps_one_connection_and_replaces_one_the_server_closed():
    router = Router(keep_alive=True)
    try:
        for name in ("a", "b"):
            router.json(name, 200, reply("tcp://10.0.0.2:5555", name))
        router.json("x", 404, {"error": "unknown_model", "message": "no x"})
        for name in ("a", "b", "a"):
            assert resolve(router.url, name)["avatar"] == name
        with pytest.raises(ResolveError, match="unknown_model"):           # an error reply keeps it too
            resolve(router.url, "x")
        assert resolve(router.url, "b")["avatar"] == "b"
        assert len(set(router.peers)) == 1, router.peers                    # five resolves, one connection
        router.drop_connections()                                            # the server closes it while idle
        time.sleep(0.1)
        assert resolve(router.url, "a")["avatar"] == "a"                    # a new one, no error
        assert len(set(router.peers)) == 2
        other: list = []
        t = threading.Thread(target=lambda: other.append(resolve(router.url, "b")))
        t.start()
        t.join(10)
        assert other and other[0]["avatar"] == "b"
        assert len(set(router.peers)) == 3                                  # another thread: its own
    finally:
        router.close()


@pytest.mark.parametrize("status,code,message", [
    (404, "unknown_model", "no engine host has an avatar named 'x'"),
    (503, "no_host", "no healthy engine host is available (known hosts: 2; down: {...})"),
])
def test_router_errors_keep_their_code_and_message(router, status, code, message):
    router.json("x", status, {"error": code, "message": message})
    with pytest.raises(ResolveError) as e:
        resolve(router.url, "x")
    assert (e.value.code, e.value.message) == (code, message)


def test_a_non_json_error_or_a_missing_route_is_cluster_unavailable(router):
    router.answers["x"] = (500, "text/html", b"<html>Internal Server Error</html>")
    with pytest.raises(ResolveError) as e:
        resolve(router.url, "x")
    assert e.value.code == "cluster_unavailable"
    assert router.url in e.value.message and "HTTP 500" in e.value.message and "'x'" in e.value.message
    router.json("y", 502, {"detail": "no message"})                     # JSON, but not the router's
    with pytest.raises(ResolveError) as e:
        resolve(router.url, "y")
    assert e.value.code == "cluster_unavailable" and "HTTP 502" in e.value.message
    with pytest.raises(ResolveError) as e:                               # the proxy is up, the router is not
        resolve(router.url.replace("/lse", "/elsewhere"), "x")
    assert e.value.code == "cluster_unavailable" and "HTTP 404" in e.value.message


def test_a_closed_port_is_cluster_unavailable_naming_the_url_and_ray():
    url = f"http://127.0.0.1:{free_port()}/lse"
    t0 = time.monotonic()
    with pytest.raises(ResolveError) as e:
        resolve(url, "a")
    assert time.monotonic() - t0 < 2
    assert e.value.code == "cluster_unavailable"
    assert url in e.value.message and "Ray" in e.value.message


def test_a_router_that_never_answers_fails_within_the_timeout(router):
    router.answers["slow"] = (0, "", b"")
    t0 = time.monotonic()
    with pytest.raises(ResolveError) as e:
        resolve(router.url, "slow", timeout=0.5)
    assert time.monotonic() - t0 < 2
    assert e.value.code == "cluster_unavailable" and router.url in e.value.message


@pytest.mark.parametrize("body", [b"<html>hello</html>", b"", b"[1, 2]", b'"tcp://h:1"', b"null",
                                  json.dumps({"avatar": "a", "host": "h1"}).encode()])
def test_a_200_that_is_not_a_resolve_reply_is_bad_reply(router, body):
    router.answers["a"] = (200, "application/json", body)
    with pytest.raises(ResolveError) as e:
        resolve(router.url, "a")
    assert e.value.code == "bad_reply"
    assert router.url in e.value.message



def test_with_server_key_puts_the_replys_key_in_place_of_the_clients(router):
    router.json("k", 200, reply("tcp://10.0.0.3:5555", "k", SERVER_KEY))
    router.json("n", 200, reply("tcp://10.0.0.4:5555", "n", None))
    own_server, _ = zmq.curve_keypair()
    keys = ClientKeys.ephemeral(own_server)
    kwargs = {"timeout": 7, "keys": keys}

    endpoint, out = with_server_key(router.url, "k", 5.0, kwargs)
    assert endpoint == "tcp://10.0.0.3:5555"
    assert out["keys"].server_public == SERVER_KEY.encode()
    assert (out["keys"].public, out["keys"].secret) == (keys.public, keys.secret)   # the client's own pair kept
    assert out["timeout"] == 7
    assert kwargs["keys"] is keys and keys.server_public == own_server            # the caller's are untouched

    endpoint, out = with_server_key(router.url, "n", 5.0, kwargs)                  # no key named: the client's
    assert endpoint == "tcp://10.0.0.4:5555" and out["keys"] == keys

    endpoint, out = with_server_key(router.url, "k", 5.0, {"timeout": 3})         # no keys: none added
    assert out == {"timeout": 3}

    router.json("gone", 404, {"error": "unknown_model", "message": "m"})
    with pytest.raises(ResolveError, match="unknown_model"):
        with_server_key(router.url, "gone", 5.0, kwargs)


@pytest.mark.integration
def test_for_avatar_connects_to_the_engine_named(router, shared_engine):
    router.json("demo", 200, reply(shared_engine.endpoint, "demo"))
    router.json("nowhere", 503, {"error": "no_host", "message": "every healthy engine host is draining"})
    with Client.for_avatar(router.url, "demo", timeout=30) as c:
        assert c.resolved == shared_engine.endpoint
        assert c.health()["healthy"] is True
        assert "demo" in [m["name"] for m in c.models()]
    with pytest.raises(ResolveError) as e:
        Client.for_avatar(router.url, "nowhere", timeout=30)
    assert e.value.code == "no_host"

    async def go():
        c = await AsyncClient.for_avatar(router.url, "demo", timeout=30)
        try:
            return c.resolved, await c.health()
        finally:
            c.close()
    resolved, health = asyncio.run(go())
    assert resolved == shared_engine.endpoint and health["healthy"] is True


@pytest.mark.integration
def test_for_avatar_uses_the_server_key_the_cluster_names(router, engine_factory, tmp_path):
    """A CURVE engine whose key the client does not have: the resolve reply carries it."""
    from tests.conftest import make_keys
    keys = make_keys(tmp_path / "keys", ("alice",), ("alice",))
    eng = engine_factory(server=keys.server_toml())
    public = (keys.folder / "server.key").read_text().split('public-key = "')[1][:40]
    router.json("demo", 200, reply(eng.endpoint, "demo", public))
    other_server, _ = zmq.curve_keypair()
    mine = dataclasses.replace(keys.client("alice"), server_public=other_server)   # a wrong server key
    with Client.for_avatar(router.url, "demo", timeout=10, keys=mine) as c:
        assert c.resolved == eng.endpoint
        assert c.health()["healthy"] is True
