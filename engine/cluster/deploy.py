"""Putting the router and the agents on a Ray cluster (Ray Serve), and the environment Ray runs in.

A real multi-host setup (README "Beyond one host"): the head host runs ``ray start --head`` and
``engine-ctl cluster start --address HEAD``; each engine host runs its engine, ``ray start
--address HEAD --resources '{"lse_host_<name>": 1}'`` and ``engine-ctl cluster join``. The emulation
(``engine-ctl cluster start --emulate N``) does the same on one machine.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from engine.cluster.ranking import SLACK
from engine.cluster.router import AGENT_PREFIX, APP, ROUTE, http_url

HTTP_PORT = 8000
RESOLVE_PORT = 8001
HEAD = "node:__internal_head__"                     # Ray's resource of the head node


def resource(host: str) -> str:
    """The Ray custom resource that pins ``host``'s agent to its node."""
    return f"lse_host_{host}"


def ray_environment(run_dir: Path, loopback: bool = True) -> dict[str, str]:
    """Ray's settings for this engine's cluster commands, set before Ray is imported (it reads them
    then): no usage reports, temp files under the run dir (under /tmp when the run dir's path is too
    long for Ray's Unix sockets) and, for a cluster on loopback (the emulation, a head at
    127.0.0.1), 127.0.0.1 kept as the nodes' address (Ray would put the host's first interface's)."""
    tmp = run_dir / "ray"
    if len(str(tmp.resolve())) > 40:                    # Ray adds ~65 characters; sockets allow 107
        tmp = Path("/tmp") / f"lse-ray-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]}"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(tmp)}
    if loopback:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.update(env)
    return env


def deploy_router(http_host: str = "127.0.0.1", http_port: int = HTTP_PORT, slack: float = SLACK,
                  proxy_location: str = "EveryNode", resolve_host: str | None = None,
                  resolve_port: int = RESOLVE_PORT) -> tuple[str, str]:
    """The router app on the head node, its own resolve listener (``resolve_host:resolve_port``,
    ``http_host`` unless told; none with port 0) and Serve's HTTP proxies (on ``http_host``, loopback
    unless told, of every node unless ``proxy_location`` says otherwise: each host's clients can
    resolve locally). Returns the URL to resolve
    at (the listener's, else the proxy's on this node) and the proxy's URL on this node."""
    from ray import serve

    from engine.cluster.router import Router
    serve.start(proxy_location=proxy_location, http_options={"host": http_host, "port": http_port})
    listen = (resolve_host or http_host, resolve_port) if resolve_port else None
    opts = {"num_cpus": 0, "resources": {HEAD: 0.001}}   # pinned: the listener's address is the head's
    app = serve.deployment(Router).options(name="Router", num_replicas=1, ray_actor_options=opts)
    try:
        serve.run(app.bind(slack, listen), name=APP, route_prefix=ROUTE, blocking=False)
    except RuntimeError as e:                          # Serve says only "failed": add the replica's reason
        why = ""
        try:
            why = serve.status().applications[APP].deployments["Router"].message
        except Exception:                              # noqa: BLE001 (the first error is the one to show)
            pass
        raise RuntimeError(f"{e} {why}".strip()) from None
    proxy = http_url(http_host, http_port)
    return (http_url(*listen) if listen else proxy), proxy


def deploy_agent(host: str, endpoint: str, server_key_file: str | None = None,
                 client_key_file: str | None = None) -> None:
    """``host``'s agent, on the Ray node that has the resource ``lse_host_<host>``."""
    from ray import serve

    from engine.cluster.agent import Agent
    opts = {"num_cpus": 0, "resources": {resource(host): 0.001}}
    app = serve.deployment(Agent).options(name="Agent", num_replicas=1, ray_actor_options=opts)
    serve.run(app.bind(host, endpoint, server_key_file, client_key_file), name=AGENT_PREFIX + host,
              route_prefix=None, blocking=False)


def remove_agent(host: str) -> None:
    from ray import serve
    serve.delete(AGENT_PREFIX + host)
