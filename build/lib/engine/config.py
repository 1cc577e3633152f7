"""One typed configuration tree for the whole engine, loaded from ``engine.toml``.

Every value is validated once, on load; a bad value raises :class:`ConfigError` naming the key
(``capacity.background_bytes``) and what was expected. Keys that are not known are errors too,
so a typo never silently falls back to a default.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

PasteMode = Literal["synctalk", "stretch"]
WrapMode = Literal["pingpong", "modulo"]
Subsampling = Literal["444", "422", "420", "411"]

PASTE_MODES = ("synctalk", "stretch")
WRAP_MODES = ("pingpong", "modulo")
SUBSAMPLINGS = ("444", "422", "420", "411")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class ServerConfig:
    front: str = "tcp://127.0.0.1:5555"   # client ROUTER socket
    control: str = ""                       # supervisor control socket; "" = ipc in run_dir
    run_dir: str = ""                       # pid file, logs, ipc sockets; "" = ./.run
    instance: str = "lse"                   # prefix of every shared-memory segment name
    log_level: str = "INFO"


@dataclass(frozen=True)
class GpuConfig:
    devices: tuple[int, ...] | Literal["auto"] = "auto"   # () = CPU provider
    slots_per_device: int = 1
    intra_op_threads: int = 0           # 0 = onnxruntime's choice
    io_binding: bool = True


@dataclass(frozen=True)
class CompositorConfig:
    processes: int = 0                  # 0 = one per CPU core


@dataclass(frozen=True)
class RingConfig:
    slots: int = 4                      # in-flight batches per GPU worker
    max_batch: int = 50
    max_face: int = 320                 # largest network crop side the ring is sized for


@dataclass(frozen=True)
class CapacityConfig:
    models_per_device: int = 8          # ONNX sessions a GPU worker keeps
    background_bytes: int = 8 << 30     # decoded backgrounds kept in shared memory
    max_pending: int = 256              # requests queued in the front when every ring is full


@dataclass(frozen=True)
class OutputConfig:
    jpeg_quality: int = 75
    chroma_subsampling: Subsampling = "420"
    fastdct: bool = True


@dataclass(frozen=True)
class StreamsConfig:
    batch_frames: int = 8               # frames of one stream per batch (more only when it fell behind)
    max_streams: int = 64
    max_inflight_batches: int = 2       # per stream
    idle_timeout_s: float = 30.0        # no audio for this long and nothing left to send: closed
    audio_encoder: str = "audio_encoder.onnx"   # under models_root, or per avatar folder (which wins)


@dataclass(frozen=True)
class SupervisionConfig:
    ready_timeout_s: float = 120.0
    heartbeat_timeout_s: float = 60.0
    max_restarts: int = 5               # within restart_window_s, per role
    restart_window_s: float = 60.0
    request_timeout_s: float = 60.0     # a request still waiting for a ring slot after this gets "busy"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: str = ""                      # folder, relative to models_root; "" = <name>
    preload: bool = False
    paste: PasteMode = "synctalk"
    wrap: WrapMode = "pingpong"
    preferred_gpu: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    compositor: CompositorConfig = field(default_factory=CompositorConfig)
    ring: RingConfig = field(default_factory=RingConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    models_root: str = "models"
    models: dict[str, ModelConfig] = field(default_factory=dict)
    source: str = ""                    # the file it was loaded from

    # -- derived values -------------------------------------------------------------------------
    @property
    def root_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    @property
    def models_dir(self) -> Path:
        p = Path(self.models_root)
        return p if p.is_absolute() else self.root_dir / p

    @property
    def run_path(self) -> Path:
        p = Path(self.server.run_dir or ".run")
        return p if p.is_absolute() else self.root_dir / p

    @property
    def control_endpoint(self) -> str:
        return self.server.control or f"ipc://{self.run_path / 'control.sock'}"

    @property
    def backend_endpoint(self) -> str:
        return f"ipc://{self.run_path / 'backend.sock'}"

    def gpu_devices(self) -> tuple[int, ...]:
        """GPU ids to run workers on; ``auto`` asks the driver (never CUDA) in this process."""
        if self.gpu.devices == "auto":
            return detect_gpus()
        return tuple(self.gpu.devices)

    def compositor_count(self) -> int:
        return self.compositor.processes or max(1, os.cpu_count() or 1)

    def model(self, name: str) -> ModelConfig:
        return self.models.get(name) or ModelConfig(name=name)


def detect_gpus() -> tuple[int, ...]:
    """Count NVIDIA GPUs from the driver's proc files, without loading CUDA in this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    root = Path("/proc/driver/nvidia/gpus")
    n = len(list(root.iterdir())) if root.is_dir() else 0
    if n == 0 and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            n = 0
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() not in ("", "-1")]
        n = min(n, len(ids))
    return tuple(range(n))


# -- validation ----------------------------------------------------------------------------------
def _check(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_seconds(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and v > 0


def _build(cls: type, table: Any, prefix: str, **extra: Any) -> Any:
    _check(isinstance(table, dict), prefix, "a table", table)
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = dict(extra)
    for key, value in table.items():
        full = f"{prefix}.{key}"
        if key not in known or key in extra:
            raise ConfigError(f"{full}: unknown key (known: {', '.join(k for k in known if k not in extra)})")
        kwargs[key] = value
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def _validate(obj: Any, prefix: str) -> None:
    rules: dict[str, tuple[Any, str]] = {
        # key: (predicate, expected)
        "front": (lambda v: isinstance(v, str) and "://" in v, "a ZeroMQ endpoint such as tcp://127.0.0.1:5555"),
        "control": (lambda v: isinstance(v, str) and (v == "" or "://" in v), "a ZeroMQ endpoint or \"\""),
        "run_dir": (lambda v: isinstance(v, str), "a path"),
        "instance": (lambda v: isinstance(v, str) and v.isalnum() and 0 < len(v) <= 16, "1-16 letters or digits"),
        "log_level": (lambda v: v in ("DEBUG", "INFO", "WARNING", "ERROR"), "DEBUG, INFO, WARNING or ERROR"),
        "devices": (lambda v: v == "auto" or (isinstance(v, (list, tuple)) and all(_is_int(d) and d >= 0 for d in v)),
                    '"auto" or a list of GPU ids such as [0, 1] ([] = CPU provider)'),
        "slots_per_device": (lambda v: _is_int(v) and 1 <= v <= 64, "an integer 1..64"),
        "intra_op_threads": (lambda v: _is_int(v) and 0 <= v <= 256, "an integer 0..256"),
        "io_binding": (lambda v: isinstance(v, bool), "true or false"),
        "processes": (lambda v: _is_int(v) and 0 <= v <= 256, "an integer 0..256 (0 = one per core)"),
        "slots": (lambda v: _is_int(v) and 1 <= v <= 256, "an integer 1..256"),
        "max_batch": (lambda v: _is_int(v) and 1 <= v <= 50, "an integer 1..50"),
        "max_face": (lambda v: _is_int(v) and 32 <= v <= 1024, "an integer 32..1024"),
        "models_per_device": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "background_bytes": (lambda v: _is_int(v) and v >= 1 << 20, "a byte count >= 1048576"),
        "max_pending": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "jpeg_quality": (lambda v: _is_int(v) and 1 <= v <= 100, "an integer 1..100"),
        "chroma_subsampling": (lambda v: v in SUBSAMPLINGS, "one of " + ", ".join(SUBSAMPLINGS)),
        "fastdct": (lambda v: isinstance(v, bool), "true or false"),
        "ready_timeout_s": (lambda v: _is_seconds(v), "a positive number of seconds"),
        "heartbeat_timeout_s": (lambda v: _is_seconds(v), "a positive number of seconds"),
        "max_restarts": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "restart_window_s": (lambda v: _is_seconds(v), "a positive number of seconds"),
        "request_timeout_s": (lambda v: _is_seconds(v), "a positive number of seconds"),
        "path": (lambda v: isinstance(v, str), "a folder path"),
        "preload": (lambda v: isinstance(v, bool), "true or false"),
        "paste": (lambda v: v in PASTE_MODES, "one of " + ", ".join(PASTE_MODES)),
        "wrap": (lambda v: v in WRAP_MODES, "one of " + ", ".join(WRAP_MODES)),
        "preferred_gpu": (lambda v: v is None or (_is_int(v) and v >= 0), "a GPU id"),
        "name": (lambda v: isinstance(v, str) and v != "", "a model name"),
        "batch_frames": (lambda v: _is_int(v) and 1 <= v <= 50, "an integer 1..50"),
        "max_streams": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "max_inflight_batches": (lambda v: _is_int(v) and 1 <= v <= 16, "an integer 1..16"),
        "idle_timeout_s": (lambda v: _is_seconds(v), "a positive number of seconds"),
        "audio_encoder": (lambda v: isinstance(v, str) and v != "", "a file name"),
    }
    for f in fields(obj):
        if f.name in rules:
            pred, expected = rules[f.name]
            value = getattr(obj, f.name)
            _check(pred(value), f"{prefix}.{f.name}", expected, value)


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> EngineConfig:
    """Read and validate ``engine.toml`` (or the defaults when ``path`` is None)."""
    data: dict[str, Any] = {}
    source = ""
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        source = str(p.resolve())
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config_from_dict(data, source)


def config_from_dict(data: dict[str, Any], source: str = "") -> EngineConfig:
    sections = {"server": ServerConfig, "gpu": GpuConfig, "compositor": CompositorConfig, "ring": RingConfig,
                "capacity": CapacityConfig, "output": OutputConfig, "supervision": SupervisionConfig,
                "streams": StreamsConfig}
    kwargs: dict[str, Any] = {"source": source}
    for key, value in data.items():
        if key in sections:
            kwargs[key] = _build(sections[key], value, key)
        elif key == "models_root":
            _check(isinstance(value, str) and value != "", key, "a folder path", value)
            kwargs[key] = value
        elif key == "models":
            _check(isinstance(value, dict), key, "a table of [models.NAME] sections", value)
            kwargs[key] = {name: _build(ModelConfig, t, f"models.{name}", name=name) for name, t in value.items()}
        else:
            raise ConfigError(f"{key}: unknown key (known: {', '.join([*sections, 'models_root', 'models'])})")
    cfg = EngineConfig(**kwargs)
    if isinstance(cfg.gpu.devices, list):
        cfg = replace(cfg, gpu=replace(cfg.gpu, devices=tuple(cfg.gpu.devices)))
    return cfg
