"""Resolve an avatar to the engine that should serve it, through a cluster's router (engine.cluster):
one HTTP GET, standard library only, so a client needs no Ray. The client then connects to that
engine directly and speaks the protocol (``Client.for_avatar``).

``GET <cluster>/resolve?avatar=NAME`` answers ``{"avatar", "host", "endpoint", "hot", "server_key"}``
(``server_key``: the engine's CURVE public key, Z85, or null); an error is ``{"error", "message"}``
with HTTP 404 (``unknown_model``: every host has reported its avatars and none has it; until then
an unknown name is placed like any other and fails at the engine), 503 (``no_host``: every host is
down or draining) or 400 (``bad_request``: no avatar named). A cluster whose router does not answer
(Ray down, the Serve proxy restarting) is ``cluster_unavailable``.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from engine.client.common import EngineError


class ResolveError(EngineError):
    """The cluster could not name an engine for the avatar: ``code`` is ``unknown_model``, ``no_host``,
    ``bad_request``, ``cluster_unavailable`` or ``bad_reply``."""


def resolve(cluster: str, avatar: str, timeout: float = 5.0) -> dict[str, Any]:
    """Where ``avatar`` should be served: the router's answer (see the module's doc)."""
    url = f"{cluster.rstrip('/')}/resolve?{urllib.parse.urlencode({'avatar': avatar})}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read())
            raise ResolveError(str(err["error"]), str(err["message"])) from None
        except (ValueError, KeyError, TypeError):
            raise ResolveError("cluster_unavailable", f"the cluster at {cluster} answered HTTP {e.code} "
                               f"for avatar {avatar!r}: is its router deployed?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ResolveError("cluster_unavailable", f"the cluster at {cluster} does not answer ({reason}): is Ray "
                           "up and the router deployed (engine-ctl cluster status)?") from None
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
