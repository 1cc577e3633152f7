"""``engine-ctl``: start, stop and inspect the engine (here), benchmark it and run the demo
(:mod:`engine.cli.bench_cmds`), import and check avatars (:mod:`engine.cli.avatar_cmds`)."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click

from engine.cli.avatar_cmds import avatar
from engine.cli.bench_cmds import bench, bench_streams, check, demo, render
from engine.cli.bench_networks import bench_networks
from engine.cli.cluster_cmds import cluster
from engine.cli.common import call, cfg_of, engine_client, print_json
from engine.cli.lifecycle import load_with_progress, start_detached, stop_engine
from engine.supervisor.control import control


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="LSE_CONFIG", default=None,
              help="engine.toml to use (default: ./engine.toml, else built-in defaults)")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False), envvar="LSE_CLIENT_KEY", default=None,
              help="this client's secret certificate (NAME.key_secret) for an engine with CURVE (client.secret_key)")
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False), envvar="LSE_SERVER_KEY", default=None,
              help="the engine's public certificate (client.server_key; default: the one in "
                   "server.curve_secret_key)")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, client_key: str | None, server_key: str | None) -> None:
    """Real-time lip-sync engine control."""
    ctx.obj = {"config": config_path, "client_key": client_key, "server_key": server_key}


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None)
@click.option("--detach", is_flag=True, help="run in the background (log: <run_dir>/engine.log unless "
              "server.log_file says otherwise); return once the engine is ready")
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for ready with --detach")
@click.option("--log-file", default=None, type=click.Path(dir_okay=False),
              help="write every process's output here, size-rotated (server.log_file)")
@click.pass_context
def start(ctx: click.Context, config_path: str | None, detach: bool, timeout: float, log_file: str | None) -> None:
    """Start the supervisor (front, GPU workers, compositors)."""
    cfg = cfg_of(ctx, config_path)
    if log_file is not None:
        cfg = replace(cfg, server=replace(cfg.server, log_file=str(Path(log_file).resolve())))
    from engine.front.security import SecurityError, preflight
    try:
        for warning in preflight(cfg):
            click.echo(f"warning: {warning}", err=True)
    except SecurityError as e:
        raise click.ClickException(f"configuration: {e}") from None
    if detach:
        start_detached(cfg, timeout)
        return
    from engine.supervisor.supervisor import run_supervisor
    sys.exit(run_supervisor(cfg))


@main.command()
@click.option("--timeout", default=30.0, show_default=True)
@click.pass_context
def stop(ctx: click.Context, timeout: float) -> None:
    """Stop a running engine and wait until it is gone."""
    cfg = cfg_of(ctx)
    stop_engine(cfg, timeout)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Every engine process: role, pid, state, restarts, uptime, memory."""
    cfg = cfg_of(ctx)
    st = control(cfg, "status")
    if st is None:
        raise click.ClickException("no engine answers on " + cfg.control_endpoint)
    if as_json:
        print_json(st)
        return
    click.echo(f"engine {st['version']}  {'ready' if st['ready'] else 'starting'}  front {st['front']}")
    click.echo(f"{'role':<12}{'idx':>4}{'pid':>9}  {'state':<11}{'restarts':>9}{'uptime s':>10}{'RSS MB':>9}"
               f"{'USS MB':>9}")
    for p in st["processes"]:
        click.echo(f"{p['role']:<12}{p['idx']:>4}{p['pid'] or '-':>9}  {p['state']:<11}{p['restarts']:>9}"
                   f"{p['uptime_s']:>10.1f}{p['rss_bytes'] / 1e6:>9.1f}{p.get('uss_bytes', 0) / 1e6:>9.1f}")
    total = sum(s["resident"] for s in st["shared_memory"])
    click.echo(f"shared memory: {len(st['shared_memory'])} segments, {total / 1e6:.1f} MB resident")
    for seg in st["shared_memory"]:
        click.echo(f"  {seg['name']:<32}{seg['size'] / 1e6:>10.1f} MB mapped {seg['resident'] / 1e6:>10.1f} MB resident")


@main.command()
@click.pass_context
def health(ctx: click.Context) -> None:
    """The front's health reply."""
    with engine_client(cfg_of(ctx), 10) as c:
        print_json(call(c.health))


@main.command()
@click.pass_context
def models(ctx: click.Context) -> None:
    """Every avatar under models_root: loaded or not, requests, mean time, memory, last used."""
    with engine_client(cfg_of(ctx), 10) as c:
        print_json(call(c.models))


@main.command()
@click.argument("name")
@click.pass_context
def load(ctx: click.Context, name: str) -> None:
    """Load an avatar's backgrounds into shared memory (with a progress bar) and its network."""
    cfg = cfg_of(ctx)
    load_with_progress(cfg, name)


@main.command()
@click.argument("name")
@click.pass_context
def unload(ctx: click.Context, name: str) -> None:
    """Drop an avatar's backgrounds and networks."""
    with engine_client(cfg_of(ctx), 10) as c:
        print_json(call(lambda: c.unload(name)))


@main.command()
@click.argument("name")
@click.option("--dir", "folder", type=click.Path(file_okay=False), default="keys", show_default=True,
              help="where to write NAME.key and NAME.key_secret")
@click.option("--force", is_flag=True, help="replace an existing key pair of that name")
def keygen(name: str, folder: str, force: bool) -> None:
    """Write a CURVE key pair: NAME.key (public: give it to the other side) and NAME.key_secret
    (secret, mode 0600: keep it). The engine's pair is server.curve_secret_key; a client's public
    NAME.key goes into the engine's server.curve_clients folder, and NAME is its key's name in
    quotas, logs and metrics."""
    from engine.runtime.keys import CertificateError, generate, load
    try:
        public, secret = generate(folder, name, force)
    except CertificateError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"public key {load(public)[0].decode()}")
    click.echo(f"wrote {public} (public) and {secret} (secret, mode 600)")


for command in (check, bench, bench_streams, bench_networks, render, demo, avatar, cluster):
    main.add_command(command)
