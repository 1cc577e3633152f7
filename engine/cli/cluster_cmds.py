"""``engine-ctl cluster``: many engines behind Ray Serve (engine.cluster; the ``cluster`` extra).

On one machine, to try it or test it: ``start --emulate N`` (engine.cli.cluster_emulate). On real
hosts: the head runs ``ray start --head`` and ``cluster start --address``; each engine host runs its
engine, ``ray start --address HEAD --resources '{"lse_host_NAME": 1}'`` and ``cluster join``.
``status``, ``resolve`` and ``drain`` speak HTTP to the router (``--url``, else the emulation's, else
Serve's proxy on this node, http://127.0.0.1:8000/lse)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import click

from engine.cli.cluster_emulate import cluster_dir, emulate, read_state
from engine.supervisor.control import pid_alive
from engine.cli.common import cfg_of, print_json

DEFAULT_URL = "http://127.0.0.1:8000/lse"
URL_HELP = "the router's URL (default: the emulation's, else Serve's proxy on this node, " + DEFAULT_URL + ")"


def _ray(address: str, cfg) -> None:                               # type: ignore[no-untyped-def]
    from engine.cluster.deploy import ray_environment
    ray_environment(cfg.run_path, loopback=address.split(":")[0] in ("127.0.0.1", "localhost"))
    try:
        import ray                                                  # after: Ray reads its settings at import
    except ImportError:
        raise click.ClickException("Ray is not installed: pip install 'lipsync-engine[cluster]'") from None
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        raise click.ClickException(f"no Ray cluster at {address}: {e}") from None


def _url(ctx: click.Context, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    state = read_state(cfg_of(ctx))
    return state["url"] if state else DEFAULT_URL


def _http(method: str, url: str) -> dict:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read() or b"{}")
            raise click.ClickException(f"{body['error']}: {body['message']}") from None
        except (ValueError, KeyError, TypeError):
            raise click.ClickException(f"the cluster's router at {url.rsplit('/', 1)[0]} answered HTTP {e.code}: "
                                       "is the router deployed (or restarting)?") from None
    except (urllib.error.URLError, OSError) as e:
        raise click.ClickException(f"the cluster's router at {url.rsplit('/', 1)[0]} does not answer "
                                   f"({getattr(e, 'reason', e)}): is Ray up and the router deployed?") from None


@click.group()
def cluster() -> None:
    """Many engines behind Ray Serve: start, join, status, resolve, drain, stop."""


@cluster.command()
@click.option("--emulate", "n", type=click.IntRange(1, 64), default=None,
              help="run N engines as N Ray nodes on this machine (tests, trying it)")
@click.option("--address", default=None, help="an existing Ray cluster (the head's HOST:PORT): deploy the router there")
@click.option("--http-host", default="127.0.0.1", show_default=True,
              help="where Serve's HTTP proxies listen for resolves (loopback unless you open it); "
              "also the router's listener unless --resolve-host")
@click.option("--http-port", default=8000, show_default=True)
@click.option("--resolve-host", default=None, help="where the router's own resolve listener listens (default: "
              "--http-host); it runs on the Ray head node")
@click.option("--resolve-port", default=8001, show_default=True,
              help="the router's own resolve listener, the fast path that skips Serve's proxy (0: none)")
@click.option("--slack", default=2.0, show_default=True, help="load (busy units per GPU) a hot host may exceed "
              "the least loaded by and still get its avatars")
@click.option("--detach", is_flag=True, help="with --emulate: in the background (log: <run_dir>/cluster/cluster.log)")
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for ready with --detach")
@click.pass_context
def start(ctx: click.Context, n: int | None, address: str | None, http_host: str, http_port: int,
          resolve_host: str | None, resolve_port: int, slack: float, detach: bool, timeout: float) -> None:
    """Start the control plane: an emulated cluster (--emulate N) or the router on a Ray cluster (--address)."""
    cfg = cfg_of(ctx)
    if (n is None) == (address is None):
        raise click.UsageError("give --emulate N or --address HEAD:PORT")
    if address is not None:
        _ray(address, cfg)
        from engine.cluster.deploy import deploy_router
        try:
            url, proxy = deploy_router(http_host, http_port, slack, resolve_host=resolve_host,
                                       resolve_port=resolve_port)
        except Exception as e:                          # Serve's error names the replica's (a taken port...)
            raise click.ClickException(f"could not deploy the router: {e}") from None
        click.echo(f"router deployed: resolve at {url}" + (f" (through Serve's proxy: {proxy})" if url != proxy else ""))
        return
    if http_host != "127.0.0.1" or resolve_host not in (None, "127.0.0.1"):
        raise click.UsageError("the emulation listens on loopback only")
    if not detach:
        emulate(cfg, n, http_port, resolve_port, slack)
        return
    root = cluster_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "engine.cli"] + (["--config", cfg.source] if cfg.source else [])
    args += ["cluster", "start", "--emulate", str(n), "--http-port", str(http_port), "--resolve-port", str(resolve_port),
             "--slack", str(slack)]
    with open(root / "cluster.log", "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(cfg.root_dir) if cfg.source else None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(cfg)
        if state and state.get("pid") == proc.pid:
            click.echo(f"cluster of {n} emulated hosts ready (pid {proc.pid}, {state['started_s']} s): "
                       f"resolve at {state['url']}")
            return
        if proc.poll() is not None:
            tail = (root / "cluster.log").read_text(errors="replace").splitlines()[-20:]
            raise click.ClickException("the cluster emulation exited during start-up:\n" + "\n".join(tail))
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    raise click.ClickException(f"the cluster emulation was not ready within {timeout} s; see {root / 'cluster.log'}")


@cluster.command()
@click.option("--address", required=True, help="the Ray cluster (the head's HOST:PORT)")
@click.option("--host", "name", required=True, help="this host's name: its Ray node has the resource lse_host_NAME")
@click.option("--endpoint", required=True, help="this host's engine as clients reach it (tcp://ADDRESS:PORT)")
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="the engine's public key file, when it uses CURVE (clients are told it)")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="the agent's own secret key file, authorised by the engine (with --server-key)")
@click.pass_context
def join(ctx: click.Context, address: str, name: str, endpoint: str, server_key: str | None,
         client_key: str | None) -> None:
    """Deploy this host's agent: the router starts placing avatars on its engine."""
    if bool(server_key) != bool(client_key):
        raise click.UsageError("--server-key and --client-key go together")
    _ray(address, cfg_of(ctx))
    from engine.cluster.deploy import deploy_agent
    deploy_agent(name, endpoint, os.path.abspath(server_key) if server_key else None,
                 os.path.abspath(client_key) if client_key else None)
    click.echo(f"agent of {name} deployed ({endpoint})")


@cluster.command()
@click.option("--address", required=True)
@click.option("--host", "name", required=True)
@click.pass_context
def leave(ctx: click.Context, address: str, name: str) -> None:
    """Remove a host's agent: nothing new is placed there (its engine keeps serving its clients)."""
    _ray(address, cfg_of(ctx))
    from engine.cluster.deploy import remove_agent
    remove_agent(name)
    click.echo(f"agent of {name} removed")


@cluster.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """Per host: health, draining, load, streams, avatars hot, free bytes; the cluster's hit ratio."""
    st = _http("GET", _url(ctx, url) + "/status")
    if as_json:
        print_json(st)
        return
    click.echo(f"{'host':10} {'state':9} {'load':>6} {'streams':>7} {'hot':>5} {'free MB':>9} {'resolved':>8}  endpoint")
    for h in st["hosts"]:
        state = "down" if not h["healthy"] else "draining" if h["draining"] else "up"
        click.echo(f"{h['host']:10} {state:9} {h['load']:6.2f} {h['streams']:7d} {len(h['hot']):5d} "
                   f"{h['free_bytes'] / 1e6:9.0f} {h['resolved']:8d}  {h['endpoint']}"
                   + (f"  ({h['error']})" if h["error"] else ""))
    ratio = st["hit_ratio"]
    click.echo(f"resolves {st['resolves']}; hit ratio {'-' if ratio is None else f'{100 * ratio:.1f}%'}"
               + (f"; the router's listener: {st['listen']}" if st.get("listen") else ""))


@cluster.command()
@click.argument("avatar")
@click.option("--url", default=None, help=URL_HELP)
@click.pass_context
def resolve(ctx: click.Context, avatar: str, url: str | None) -> None:
    """The engine the router picks for AVATAR (JSON: host, endpoint, hot, server_key)."""
    from engine.client.resolve import ResolveError, resolve as resolve_http
    try:
        print_json(resolve_http(_url(ctx, url), avatar))
    except ResolveError as e:
        raise click.ClickException(str(e)) from None


@cluster.command()
@click.argument("host")
@click.option("--undo", is_flag=True, help="take new work again")
@click.option("--url", default=None, help=URL_HELP)
@click.pass_context
def drain(ctx: click.Context, host: str, undo: bool, url: str | None) -> None:
    """No new avatars on HOST; its running streams and connected clients go on."""
    print_json(_http("POST", _url(ctx, url) + f"/drain?host={host}" + ("&undo=1" if undo else "")))


@cluster.command()
@click.option("--keep-engines", is_flag=True, help="stop Ray only: the emulated engines go on serving")
@click.option("--address", default=None, help="a real cluster: remove the router and the agents (engines untouched)")
@click.option("--timeout", default=120.0, show_default=True)
@click.pass_context
def stop(ctx: click.Context, keep_engines: bool, address: str | None, timeout: float) -> None:
    """Stop the emulation (Ray, and its engines unless --keep-engines), or Serve on a real cluster."""
    cfg = cfg_of(ctx)
    if address is not None:
        _ray(address, cfg)
        from ray import serve
        serve.shutdown()
        click.echo("router and agents removed")
        return
    state = read_state(cfg)
    if not state or not pid_alive(int(state["pid"])):
        raise click.ClickException("no cluster emulation is running")
    pid = int(state["pid"])
    os.kill(pid, signal.SIGUSR1 if keep_engines else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise click.ClickException(f"the cluster emulation (pid {pid}) did not stop within {timeout} s")
        time.sleep(0.3)
    click.echo("cluster stopped" + (" (engines still running)" if keep_engines else ""))
