"""One agent per host, a Ray Serve deployment pinned to that host's Ray node (the custom resource
``lse_host_<name>``), beside the host's engine: it reports what the engine holds (avatars hot and
known, free shared memory, streams and load, health) and loads an avatar when the router places one
there. It speaks the engine's protocol on the host (usually loopback); it holds the host's
draining flag, so a router that restarts learns it again from the next report."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from engine.client import AsyncClient, EngineError
from engine.runtime.keys import ClientKeys

log = logging.getLogger("engine.cluster.agent")

TIMEOUT_S = 1.5                 # an engine that does not answer health within this is reported down
MODELS_EVERY_S = 1.0            # the avatar list (models) is read at most this often
HOT_STATES = ("loaded", "loading")


def report_from(host: str, endpoint: str, health: dict[str, Any], models: list[dict[str, Any]] | None,
                draining: bool, server_key: str | None) -> dict[str, Any]:
    """The report the router ranks by, from the engine's ``health`` and ``models`` replies."""
    workers = health.get("gpu_workers", [])
    busy = len(health.get("streams", [])) + int(health.get("pending", 0)) + sum(int(w.get("inflight", 0)) for w in workers)
    bg = health.get("background_bytes", {"used": 0, "budget": 0})
    out: dict[str, Any] = {
        "host": host, "endpoint": endpoint, "server_key": server_key, "draining": draining,
        "healthy": bool(health.get("healthy")), "error": "" if health.get("healthy") else "the engine is not healthy",
        "load": busy / max(1, len(workers)), "gpus": len(workers), "streams": len(health.get("streams", [])),
        "free_bytes": max(0, int(bg["budget"]) - int(bg["used"])), "hot": None, "known": None,
    }
    if models is not None:
        out["hot"] = sorted(m["name"] for m in models if m.get("state") in HOT_STATES)
        out["known"] = sorted(m["name"] for m in models if m.get("state") != "invalid")
    return out


class Agent:
    """The agent's replica (deployed by :func:`engine.cluster.deploy.deploy_agent`)."""

    def __init__(self, host: str, endpoint: str, server_key_file: str | None = None,
                 client_key_file: str | None = None) -> None:
        self.host, self.endpoint = host, endpoint
        self.keys = ClientKeys.from_files(server_key_file, client_key_file) if server_key_file and client_key_file else None
        self.server_key = self.keys.server_public.decode() if self.keys else None
        self.draining = False
        self._client: AsyncClient | None = None
        self._models: list[dict[str, Any]] | None = None
        self._models_at = 0.0
        self._loads: set[asyncio.Task] = set()

    def _engine(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient(self.endpoint, timeout=TIMEOUT_S, keys=self.keys)
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client, self._models = None, None

    async def report(self) -> dict[str, Any]:
        try:
            health = await self._engine().health()
            if time.monotonic() - self._models_at >= MODELS_EVERY_S or self._models is None:
                self._models, self._models_at = await self._engine().models(), time.monotonic()
        except EngineError as e:                       # a timeout, or the engine went away: a fresh socket next time
            self._drop_client()
            return {"host": self.host, "endpoint": self.endpoint, "server_key": self.server_key,
                    "draining": self.draining, "healthy": False, "hot": [], "known": None,
                    "error": f"the engine at {self.endpoint} did not answer: {e}"}
        return report_from(self.host, self.endpoint, health, self._models, self.draining, self.server_key)

    async def set_draining(self, on: bool) -> bool:
        self.draining = bool(on)
        return self.draining

    async def prepare(self, avatar: str) -> None:
        """Load ``avatar`` in the background (the router placed it here); a failure is only logged:
        the client's first request loads it anyway, or gets the engine's error."""
        async def load() -> None:
            client = AsyncClient(self.endpoint, timeout=600.0, keys=self.keys)
            try:
                reply = await client.call("load", {"model": avatar})
                if not reply.ok:
                    log.warning("loading %s on %s failed: %s", avatar, self.host, reply.error)
            except EngineError as e:
                log.warning("loading %s on %s failed: %s", avatar, self.host, e)
            finally:
                client.close()
        task = asyncio.get_running_loop().create_task(load())
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
