"""The router: a Ray Serve deployment (one replica) that picks the engine host for an avatar.

It finds the agents by their Serve applications (``lse-agent-<host>``), asks each for its report
every :data:`POLL_S`, and ranks hosts with :mod:`engine.cluster.ranking` over the state in
:class:`engine.cluster.table.Table`. On a placement where the avatar is not hot it asks that host's
agent to load it. HTTP, under the app's route prefix (``/lse``):

- ``GET /resolve?avatar=NAME``: ``{"avatar", "host", "endpoint", "hot", "server_key"}``; as
  ``{"error", "message"}``: 404 ``unknown_model``, 503 ``no_host``, 400 ``bad_request`` (no avatar
  named), 503 ``cluster_unavailable`` (a new replica that has not polled the agents yet);
- ``GET /status``: per host (endpoint, healthy, draining, load, streams, free bytes, avatars hot,
  resolves), the hit ratio and ``listen`` (the listener's URL);
- ``POST /drain?host=NAME`` (``&undo=1`` to take work again): no new avatars there;
- ``GET /metrics``: Prometheus' text format.

The same routes are served by the replica's own listener (:mod:`engine.cluster.listener`,
``listen=(host, port)``), the fast resolve path that skips Serve's proxy.

Python callers with a Ray connection use a handle instead:
``serve.get_app_handle("lse").resolve.remote("demo").result()`` (same bodies, errors included).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from engine.cluster.ranking import SLACK
from engine.cluster.table import Table

log = logging.getLogger("engine.cluster.router")

APP = "lse"
ROUTE = "/lse"                                         # the app's route prefix; the listener's URLs use it too
AGENT_PREFIX = "lse-agent-"
POLL_S = 0.5
DISCOVER_S = 2.0
REPORT_TIMEOUT_S = 2.0


def http_url(host: str, port: int) -> str:
    """The router's URL at ``host:port`` (an IPv6 address bracketed)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{ROUTE}"


class Router:
    def __init__(self, slack: float = SLACK, listen: tuple[str, int] | None = None) -> None:
        self.table = Table(slack)
        self._agents: dict[str, Any] = {}              # host -> DeploymentHandle of its agent
        self._background: set[asyncio.Task] = set()
        self._started = time.monotonic()
        self._heard = False                            # a first round of discovery and reports is done
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.listener = None
        if listen is not None:
            from engine.cluster.listener import Listener
            self.listener = Listener(self.__call__, *listen)

    def __del__(self) -> None:
        if getattr(self, "listener", None) is not None:
            self.listener.close()

    async def _run(self) -> None:
        discovered = 0.0
        while True:
            try:
                if time.monotonic() - discovered >= DISCOVER_S:
                    await self._discover()
                    discovered = time.monotonic()
                await asyncio.gather(*(self._poll(h, a) for h, a in list(self._agents.items())))
                self._heard = True
            except Exception:                          # never let the loop die: log and go on
                log.exception("the router's poll loop failed; retrying")
            await asyncio.sleep(POLL_S)

    async def _discover(self) -> None:
        from ray import serve
        status = await asyncio.to_thread(serve.status)
        hosts = {name[len(AGENT_PREFIX):] for name in status.applications if name.startswith(AGENT_PREFIX)}
        for host in hosts - self._agents.keys():
            self._agents[host] = serve.get_app_handle(AGENT_PREFIX + host)
        for host in self._agents.keys() - hosts:       # its agent was removed (engine-ctl cluster leave)
            del self._agents[host]
            self.table.forget(host)

    async def _poll(self, host: str, agent: Any) -> None:
        try:
            self.table.update(await asyncio.wait_for(agent.report.remote(), REPORT_TIMEOUT_S))
        except Exception as e:                         # its node is gone or busy: the report goes stale
            if host in self.table.hosts:
                self.table.hosts[host].error = f"its agent did not report: {type(e).__name__}"

    def _prepare(self, host: str, avatar: str) -> None:
        """Ask ``host``'s agent to load ``avatar``, without waiting (a failure is the agent's to log)."""
        async def ask() -> None:
            try:
                await self._agents[host].prepare.remote(avatar)
            except Exception as e:
                log.warning("could not ask %s to load %s: %s", host, avatar, e)
        task = asyncio.get_running_loop().create_task(ask())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the methods (handle callers) ----------------------------------------------------------------

    def _resolve(self, avatar: str) -> tuple[int, dict[str, Any]]:
        if not self._heard:                            # a new replica knows no host yet: not "no_host"
            self.table.counts["starting"] += 1
            return 503, {"error": "cluster_unavailable", "message": "the router started "
                         f"{time.monotonic() - self._started:.1f} s ago and has not heard from the hosts' agents "
                         "yet: retry in a second"}
        status, body = self.table.resolve(avatar)
        if status == 200 and not body["hot"] and body["host"] in self._agents:     # load it there now
            self._prepare(body["host"], avatar)
        return status, body

    async def resolve(self, avatar: str) -> dict[str, Any]:
        return self._resolve(avatar)[1]

    def _status(self) -> dict[str, Any]:
        out = self.table.status()
        if self.listener is not None:                  # where the fast resolve path answers
            out["listen"] = http_url(self.listener.host, self.listener.port)
        return out

    async def status(self) -> dict[str, Any]:
        return self._status()

    async def drain(self, host: str, on: bool = True) -> dict[str, Any]:
        if host not in self._agents:
            return {"error": "unknown_host", "message": f"no agent for host {host!r}; hosts: {sorted(self._agents)}"}
        await self._agents[host].set_draining.remote(on)
        if host in self.table.hosts:
            self.table.hosts[host].view.draining = on
        return {"host": host, "draining": on}

    # -- HTTP ------------------------------------------------------------------------------------------

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, PlainTextResponse
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        q = request.query_params
        if path == "resolve" and request.method == "GET":
            if not q.get("avatar"):
                return JSONResponse({"error": "bad_request", "message": "resolve needs ?avatar=NAME"}, 400)
            status, body = self._resolve(q["avatar"])
            return JSONResponse(body, status)
        if path == "status" and request.method == "GET":
            return JSONResponse(self._status())
        if path == "metrics" and request.method == "GET":
            return PlainTextResponse(self.table.metrics(), media_type="text/plain; version=0.0.4")
        if path == "drain" and request.method == "POST":
            body = await self.drain(q.get("host", ""), q.get("undo") not in ("1", "true"))
            return JSONResponse(body, 404 if "error" in body else 200)
        return JSONResponse({"error": "not_found", "message": f"{request.method} {request.url.path}: the router "
                             "answers GET resolve, status, metrics and POST drain"}, 404)
