"""Configs derived from a user's engine.toml for an engine started by a tool (the pytest plugin's
engine under test, the cluster emulation's hosts): its own front port, run dir and shared-memory
instance, relative paths made absolute, no control socket, metrics port or log file of the original."""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

PATH_KEYS = {"": ("models_root",), "server": ("curve_secret_key", "curve_clients")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def dump_toml(data: dict[str, Any]) -> str:
    """TOML for a config tree (tables of scalars and lists, nested tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]

    def table(name: str, t: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in t.items() if not isinstance(v, dict))
        for k, v in t.items():
            if isinstance(v, dict):
                table(f"{name}.{json.dumps(k) if not k.replace('_', '').isalnum() else k}", v)
    for k, v in data.items():
        if isinstance(v, dict):
            table(k, v)
    return "\n".join(lines) + "\n"


def absolute_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """``data`` (a parsed engine.toml whose file is in ``base``) with its relative paths made absolute."""
    for section, keys in PATH_KEYS.items():
        table = data if not section else data.get(section, {})
        for k in keys:
            if isinstance(table.get(k), str) and table[k] and not Path(table[k]).is_absolute():
                table[k] = str(base / table[k])
    data.setdefault("models_root", str(base / "models"))
    return data


def write_derived(data: dict[str, Any], path: Path, *, front: str, run_dir: Path, instance: str) -> Path:
    """Write ``data`` to ``path`` with the engine's own ``front``, ``run_dir`` and ``instance``."""
    server = data.setdefault("server", {})
    server.update(front=front, run_dir=str(run_dir), instance=instance)
    for k in ("control", "log_file", "metrics"):      # its own control socket; no second metrics port; our log
        server.pop(k, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(data))
    return path
