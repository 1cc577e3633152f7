"""What every engine-ctl command shares: the configuration it runs with (``--config``, the
client keys given on the command line), a client of the engine's front, and its error handling."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from engine.runtime.config import ConfigError, EngineConfig, load_config


def load_cfg_file(path: str | None) -> EngineConfig:
    try:
        if path is None and Path("engine.toml").is_file():
            path = "engine.toml"
        return load_config(path)
    except ConfigError as e:
        raise click.ClickException(f"configuration: {e}") from None


def client_keys_or_fail(cfg: EngineConfig):
    """The CURVE keys engine-ctl connects to the front with (None: plain text)."""
    from engine.front.security import SecurityError, client_keys
    try:
        return client_keys(cfg)
    except SecurityError as e:
        raise click.ClickException(str(e)) from None


def engine_client(cfg: EngineConfig, timeout: float = 60.0):
    from engine.client import Client
    return Client(cfg.server.front, timeout=timeout, keys=client_keys_or_fail(cfg))


def call(fn):
    from engine.client import EngineError
    try:
        return fn()
    except EngineError as e:
        raise click.ClickException(str(e)) from None


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


def cfg_of(ctx: click.Context, local: str | None = None) -> EngineConfig:
    obj = ctx.obj or {}
    cfg = load_cfg_file(local or obj.get("config"))
    client = cfg.client
    if obj.get("client_key"):
        client = replace(client, secret_key=str(Path(obj["client_key"]).resolve()))
    if obj.get("server_key"):
        client = replace(client, server_key=str(Path(obj["server_key"]).resolve()))
    return replace(cfg, client=client)
