"""``engine-ctl cluster start --emulate N``: N engines (own ports, run dirs and shared-memory
instances, derived from the engine's config) as N Ray nodes on one machine, with the router and one
agent per host, for tests and for trying the cluster. The process stays in the foreground and owns
the Ray cluster it started; ``engine-ctl cluster stop`` ends it (SIGTERM: Ray and the engines;
SIGUSR1, ``--keep-engines``: Ray only, the engines go on serving and a later start finds them).
Its state is ``<run_dir>/cluster/state.json``."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import click

from engine.cli.lifecycle import start_detached, stop_engine
from engine.runtime.config import EngineConfig, load_config
from engine.runtime.derived import absolute_paths, free_port, write_derived
from engine.supervisor.control import control, pid_alive


def cluster_dir(cfg: EngineConfig) -> Path:
    return cfg.run_path / "cluster"


def read_state(cfg: EngineConfig) -> dict[str, Any] | None:
    try:
        return json.loads((cluster_dir(cfg) / "state.json").read_text())
    except (OSError, ValueError):
        return None


def host_config(cfg: EngineConfig, host: str) -> EngineConfig:
    """``host``'s engine config (written once; a later start reuses its port, so a running engine is found)."""
    path = cluster_dir(cfg) / host / "engine.toml"
    if not path.exists():
        data = tomllib.loads(Path(cfg.source).read_text()) if cfg.source else {"models_root": str(cfg.models_dir)}
        data = absolute_paths(data, cfg.root_dir)
        data.setdefault("models", {})
        write_derived(data, path, front=f"tcp://127.0.0.1:{free_port()}", run_dir=path.parent / "run",
                      instance=f"{cfg.server.instance}{host}")
    return load_config(path)


def emulate(cfg: EngineConfig, n: int, http_port: int, resolve_port: int, slack: float) -> None:
    """Run the emulation until a signal (see the module's doc)."""
    from engine.cluster.deploy import deploy_agent, deploy_router, ray_environment, resource
    state = read_state(cfg)
    if state and pid_alive(int(state["pid"])):
        raise click.ClickException(f"a cluster emulation already runs (pid {state['pid']}, {state['url']})")
    root = cluster_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    hosts = [f"h{i}" for i in range(n)]
    t0 = time.monotonic()
    configs = {}
    for host in hosts:                                 # the data plane first: engines that need no Ray
        configs[host] = hc = host_config(cfg, host)
        if control(hc, "status", 1.0) is None:
            start_detached(hc)
        else:
            click.echo(f"engine {host} already runs, front {hc.server.front}")
    engines_s = time.monotonic() - t0
    ray_tmp = ray_environment(cfg.run_path)["RAY_TMPDIR"]
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    stop = threading.Event()
    keep = threading.Event()

    def handle_signals() -> None:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGUSR1, lambda *_: (keep.set(), stop.set()))
    handle_signals()
    try:
        for host in hosts:
            cluster.add_node(num_cpus=1, resources={resource(host): 1})
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        handle_signals()                               # ray.init puts its own SIGTERM handler (exit) in place
        url, proxy = deploy_router("127.0.0.1", http_port, slack, proxy_location="HeadOnly", resolve_port=resolve_port)
        for host in hosts:
            deploy_agent(host, configs[host].server.front)
        state = {"pid": os.getpid(), "url": url, "serve_url": proxy, "ray_address": cluster.address, "ready": True,
                 "started_s": round(time.monotonic() - t0, 1), "engines_s": round(engines_s, 1),
                 "hosts": [{"host": h, "endpoint": configs[h].server.front, "config": configs[h].source}
                           for h in hosts]}
        (root / "state.json").write_text(json.dumps(state, indent=1))
        click.echo(f"cluster of {n} emulated hosts ready in {state['started_s']} s: resolve at {url}", err=True)
        while not stop.wait(0.5):
            pass
    finally:
        (root / "state.json").unlink(missing_ok=True)
        from ray import serve
        for step in (serve.shutdown, ray.shutdown, cluster.shutdown):
            try:
                step()
            except Exception as e:                      # go on: the engines must still be stopped
                click.echo(f"warning: {step.__qualname__}: {e}", err=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)        # Ray's session files and logs: ours, gone with it
        if not keep.is_set():
            for host in hosts:
                try:
                    stop_engine(configs[host]) if host in configs else None
                except click.ClickException as e:
                    click.echo(f"engine {host}: {e.message}", err=True)
