"""Resolve an avatar to the engine that should serve it, through a cluster's router (engine.cluster):
one HTTP GET, standard library only, so a client needs no Ray. The client then connects to that
engine directly and speaks the protocol (``Client.for_avatar``).

``GET <cluster>/resolve?avatar=NAME`` answers ``{"avatar", "host", "endpoint", "hot", "server_key"}``
(``server_key``: the engine's CURVE public key, Z85, or null); an error is ``{"error", "message"}``
with HTTP 404 (``unknown_model``: every host has reported its avatars and none has it; until then
an unknown name is placed like any other and fails at the engine), 503 (``no_host``: every host is
down or draining; ``cluster_unavailable``: a new router replica that has not polled the agents yet)
or 400 (``bad_request``: no avatar named). A cluster whose router does not answer (Ray down, the
router replica restarting) is ``cluster_unavailable`` too.

Each thread keeps one HTTP/1.1 connection per server (host and port) open between resolves (a new
TCP connection costs about as much as the router's answer); one the server has closed meanwhile is
replaced once.
"""
from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from typing import Any

from engine.client.common import EngineError


class ResolveError(EngineError):
    """The cluster could not name an engine for the avatar: ``code`` is ``unknown_model``, ``no_host``,
    ``bad_request``, ``cluster_unavailable`` or ``bad_reply``."""


_local = threading.local()          # .conns: (scheme, netloc) -> this thread's kept-alive connection
_STALE = (http.client.RemoteDisconnected, http.client.CannotSendRequest, ConnectionResetError, BrokenPipeError)


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """``GET url`` over this thread's kept-alive connection to its server: (HTTP status, body)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    conns: dict = _local.__dict__.setdefault("conns", {})
    key = (u.scheme, u.netloc)
    target = u.path + (f"?{u.query}" if u.query else "")
    while True:
        conn = conns.pop(key, None)
        reused = conn is not None
        if conn is None:
            kind = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
            conn = kind(u.hostname, u.port, timeout=timeout)
        else:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
        try:
            conn.request("GET", target)
            r = conn.getresponse()
            body = r.read()
        except _STALE:
            conn.close()
            if reused:                               # the server closed it while idle: once on a new one
                continue
            raise
        except BaseException:
            conn.close()
            raise
        if r.will_close:
            conn.close()
        else:
            conns[key] = conn
        return r.status, body


def resolve(cluster: str, avatar: str, timeout: float = 5.0) -> dict[str, Any]:
    """Where ``avatar`` should be served: the router's answer (see the module's doc)."""
    url = f"{cluster.rstrip('/')}/resolve?{urllib.parse.urlencode({'avatar': avatar})}"
    try:
        status, body = _get(url, timeout)
    except (OSError, http.client.HTTPException) as e:
        raise ResolveError("cluster_unavailable", f"the cluster at {cluster} does not answer ({e or type(e).__name__}): "
                           "is Ray up and the router deployed (engine-ctl cluster status)?") from None
    if status != 200:
        try:
            err = json.loads(body)
            raise ResolveError(str(err["error"]), str(err["message"])) from None
        except (ValueError, KeyError, TypeError):
            raise ResolveError("cluster_unavailable", f"the cluster at {cluster} answered HTTP {status} "
                               f"for avatar {avatar!r}: is its router deployed?") from None
    try:
        out = json.loads(body)
        out["endpoint"]                                         # noqa: B018 (checked present)
        return out
    except (ValueError, KeyError, TypeError):
        raise ResolveError("bad_reply", f"the cluster at {cluster} answered something that is not a "
                           f"resolve reply: {body[:200]!r}") from None


def with_server_key(cluster: str, avatar: str, timeout: float, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The endpoint for ``avatar`` and a client's keyword arguments with, when it has ``keys``, the
    server key the cluster names for that engine (each host's engine may have its own)."""
    where = resolve(cluster, avatar, timeout)
    keys = kwargs.get("keys")
    if keys is not None and where.get("server_key"):
        import dataclasses
        kwargs = {**kwargs, "keys": dataclasses.replace(keys, server_public=where["server_key"].encode())}
    return where["endpoint"], kwargs
