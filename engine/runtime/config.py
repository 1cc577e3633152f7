"""One typed configuration tree for the whole engine, loaded from ``engine.toml``.

Every value is validated once, on load; a bad value raises :class:`ConfigError` naming the key
(``capacity.background_bytes``) and what was expected. Keys that are not known are errors too,
so a typo never silently falls back to a default.
"""
from __future__ import annotations

import logging
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
LogFormat = Literal["text", "json"]
Encoder = Literal["splice", "full"]

Precision = Literal["fp32", "fp16"]

PASTE_MODES = ("synctalk", "stretch")
PRECISIONS = ("fp32", "fp16")
WRAP_MODES = ("pingpong", "modulo")
SUBSAMPLINGS = ("444", "422", "420", "411")
ENCODERS = ("splice", "full")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class ServerConfig:
    front: str = "tcp://127.0.0.1:5555"   # client ROUTER socket
    control: str = ""                       # supervisor control socket; "" = ipc in run_dir
    run_dir: str = ""                       # pid file, logs, ipc sockets; "" = ./.run
    instance: str = "lse"                   # prefix of every shared-memory segment name
    log_level: str = "INFO"
    log_file: str = ""                      # "" = stderr (engine-ctl start --detach: <run_dir>/engine.log)
    log_max_bytes: int = 10 << 20           # the log file is rotated at this size ...
    log_backups: int = 3                    # ... keeping this many old files
    client_keepalive_s: int = 1             # TCP keepalive idle time and probe interval to clients; 0 = off
    client_queue_bytes: int = 64 << 20      # bytes sent to one connection that it has not read yet
    slow_client_timeout_s: float = 10.0     # over client_queue_bytes this long: its streams close
    max_requests_per_client: int = 64       # requests of one connection waiting for their reply
    curve_secret_key: str = ""              # the server's secret certificate (zmq.auth format); "" = no CURVE
    curve_clients: str = ""                 # folder of authorised clients' public certificates (*.key)
    allow_plaintext: bool = False           # serve a non-loopback, non-ipc server.front without CURVE
    metrics: str = ""                       # Prometheus endpoint "HOST:PORT" (served by the supervisor); "" = off
    log_format: LogFormat = "text"          # "text" or "json" (one JSON object per line)


@dataclass(frozen=True)
class ClientConfig:
    """How engine-ctl (health, load, bench, render ...) connects to ``server.front``."""
    secret_key: str = ""                    # this client's secret certificate; needed when the engine uses CURVE
    server_key: str = ""                    # the server's public certificate; "" = from server.curve_secret_key


@dataclass(frozen=True)
class Quota:
    """Limits for the clients of one CURVE key, over all of its connections together."""
    streams: int = 16                       # open streams
    requests: int = 256                     # requests waiting for their reply
    frames_per_second: float = 0.0          # frames asked for (batch sizes, stream audio); 0 = no limit


@dataclass(frozen=True)
class QuotaOverride:
    """``[quotas.clients.NAME]``: what differs from ``[quotas]`` for client NAME (its certificate's name)."""
    name: str
    streams: int | None = None
    requests: int | None = None
    frames_per_second: float | None = None


@dataclass(frozen=True)
class QuotasConfig:
    streams: int = 16
    requests: int = 256
    frames_per_second: float = 0.0
    clients: dict[str, QuotaOverride] = field(default_factory=dict)

    def for_client(self, name: str) -> Quota:
        o = self.clients.get(name)
        base = Quota(self.streams, self.requests, self.frames_per_second)
        if o is None:
            return base
        return Quota(*(getattr(base, k) if getattr(o, k) is None else getattr(o, k)
                       for k in ("streams", "requests", "frames_per_second")))


@dataclass(frozen=True)
class GpuConfig:
    devices: tuple[int, ...] | Literal["auto"] = "auto"   # () = CPU provider
    # GPU workers per device; "auto" = 2 per GPU (two beat one on the H200: one worker's GPU idles
    # while it prepares and hands over a batch; docs/performance.md), 1 for the CPU provider
    slots_per_device: int | Literal["auto"] = "auto"
    intra_op_threads: int = 0           # 0 = onnxruntime's choice
    io_binding: bool = True
    # batch sizes a network runs at (engine/worker/buckets.py): "auto" = AUTO_BUCKETS on a GPU, exact
    # sizes on the CPU provider; "off" = exact sizes; a list = those sizes on any provider
    batch_buckets: tuple[int, ...] | Literal["auto", "off"] = "auto"
    device_buffers: bool | Literal["auto"] = "auto"   # pre-allocated per-bucket I/O buffers ("auto": on CUDA)
    cuda_graphs: bool = False           # capture a CUDA graph per bucket (CUDA only; falls back when refused)
    precision: Precision = "fp32"       # default for every avatar ([models.NAME] precision overrides)
    # one session per network architecture, each network's weights bound per run (engine/worker/weights.py):
    # "auto" = on CUDA unless cuda_graphs (loads are a file read, thousands resident), off on the CPU
    # provider (runs about 2x slower there with weights as inputs: docs/performance.md)
    shared_sessions: bool | Literal["auto"] = "auto"

    def shared(self, gpu: bool) -> bool:
        """Whether networks share sessions (``gpu``: False for the CPU provider)."""
        if self.shared_sessions == "auto":              # CUDA graphs replay fixed weights: asked for, they win
            return gpu and self.io_binding and not self.cuda_graphs
        return bool(self.shared_sessions)

    def slots(self, gpu: bool) -> int:
        """GPU worker processes per device (``gpu``: False for the CPU provider)."""
        if self.slots_per_device == "auto":
            return 2 if gpu else 1
        return self.slots_per_device


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
    models_per_device: int = 8          # networks with their own ONNX session a GPU worker keeps
    # weight bytes of the networks a GPU worker keeps resident (shared sessions or not), least recently
    # used out: "auto" = half the memory free when the worker starts (the device's on CUDA, the host's
    # on the CPU provider), shared by the workers of that device
    network_bytes: int | Literal["auto"] = "auto"
    background_bytes: int = 8 << 30     # avatar backgrounds kept in shared memory (either layout)
    max_pending: int = 256              # requests queued in the front when every ring is full
    max_pending_bytes: int = 2 << 30    # their tensors' bytes


REMOVED_OUTPUT_KEY = "fastdct"            # output.fastdct: accepted and ignored with a warning (README)


@dataclass(frozen=True)
class OutputConfig:
    jpeg_quality: int = 75
    chroma_subsampling: Subsampling = "420"
    encoder: Encoder = "splice"         # splice: encode only the face's region (engine/kernels/splice.py); full: every pixel


@dataclass(frozen=True)
class StreamsConfig:
    batch_frames: int = 8               # frames of one stream per batch (more only when it fell behind)
    max_streams: int = 64
    max_per_client: int = 16            # open streams of one connection
    max_inflight_batches: int = 2       # per stream
    max_audio_ahead_s: float = 60.0     # audio pushed but not yet played out, per stream (then busy)
    idle_timeout_s: float = 30.0        # no audio for this long and nothing left to send: closed
    audio_encoder: str = "audio_encoder.onnx"   # under models_root, or per avatar folder (which wins)


@dataclass(frozen=True)
class SchedulingConfig:
    run_ahead_s: float = 3.0            # frames of a stream rendered but not yet sent, at most
    batch_slack_ms: float = 1000.0      # a batch request's virtual deadline after its arrival
    worker_queue: int = 2               # jobs a GPU worker holds before inferring them (running + next)


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
    precision: Precision | None = None  # None = gpu.precision


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
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)
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
    def log_path(self) -> Path:
        return self.path(self.server.log_file)

    def path(self, value: str) -> Path:
        """A path setting, relative to the config file's folder."""
        p = Path(value)
        return p if p.is_absolute() else self.root_dir / p

    @property
    def curve(self) -> bool:
        """Whether the front uses CURVE (encryption and the client key allow-list)."""
        return self.server.curve_secret_key != ""

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

    def precision(self, name: str) -> str:
        """The precision avatar ``name``'s network runs at (its own setting, else the engine's)."""
        return self.model(name).precision or self.gpu.precision

    @property
    def cache_dir(self) -> Path:
        """Converted networks (fp16), keyed by their source's hash: ``<run_dir>/cache``."""
        return self.run_path / "cache"


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


def _is_seconds_or_0(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and v >= 0


def _host_port(v: str) -> bool:
    """``HOST:PORT``: an IPv4 address or a name, or ``[IPv6]``, and a port 1..65535."""
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
        return False
    return (host.startswith("[") and host.endswith("]")) or ":" not in host


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
        "log_file": (lambda v: isinstance(v, str), "a path or \"\" (stderr)"),
        "log_max_bytes": (lambda v: _is_int(v) and v >= 1 << 16, "a byte count >= 65536"),
        "log_backups": (lambda v: _is_int(v) and 1 <= v <= 100, "an integer 1..100"),
        "client_keepalive_s": (lambda v: _is_int(v) and 0 <= v <= 3600, "whole seconds 0..3600 (0 = off)"),
        "client_queue_bytes": (lambda v: _is_int(v) and v >= 1 << 20, "a byte count >= 1048576"),
        "slow_client_timeout_s": (lambda v: _is_seconds(v), "a positive number of seconds"),
        "max_requests_per_client": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "curve_secret_key": (lambda v: isinstance(v, str), "a path to the server's secret certificate or \"\""),
        "curve_clients": (lambda v: isinstance(v, str), "a folder of client public certificates or \"\""),
        "allow_plaintext": (lambda v: isinstance(v, bool), "true or false"),
        "metrics": (lambda v: isinstance(v, str) and (v == "" or _host_port(v)), 'an address "HOST:PORT" '
                    '(such as "127.0.0.1:9464") or "" (off)'),
        "log_format": (lambda v: v in ("text", "json"), '"text" or "json"'),
        "secret_key": (lambda v: isinstance(v, str), "a path to a secret certificate or \"\""),
        "server_key": (lambda v: isinstance(v, str), "a path to the server's public certificate or \"\""),
        "streams": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0"),
        "requests": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1"),
        "frames_per_second": (lambda v: v is None or _is_seconds_or_0(v), "a number of frames >= 0 (0 = no limit)"),
        "max_pending_bytes": (lambda v: _is_int(v) and v >= 1 << 20, "a byte count >= 1048576"),
        "max_per_client": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "max_audio_ahead_s": (lambda v: _is_seconds(v) and v >= 1, "a number of seconds >= 1"),
        "run_ahead_s": (lambda v: _is_seconds(v) and v >= 0.5, "a number of seconds >= 0.5"),
        "batch_slack_ms": (lambda v: _is_seconds_or_0(v) and v <= 60000, "milliseconds 0..60000"),
        "worker_queue": (lambda v: _is_int(v) and 1 <= v <= 64, "an integer 1..64"),
        "devices": (lambda v: v == "auto" or (isinstance(v, (list, tuple)) and all(_is_int(d) and d >= 0 for d in v)),
                    '"auto" or a list of GPU ids such as [0, 1] ([] = CPU provider)'),
        "slots_per_device": (lambda v: v == "auto" or (_is_int(v) and 1 <= v <= 64),
                             '"auto" (2 per GPU, 1 for the CPU provider) or an integer 1..64'),
        "intra_op_threads": (lambda v: _is_int(v) and 0 <= v <= 256, "an integer 0..256"),
        "io_binding": (lambda v: isinstance(v, bool), "true or false"),
        "batch_buckets": (lambda v: v in ("auto", "off") or (
            isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(b) and 1 <= b <= 50 for b in v)
            and list(v) == sorted(set(v))),
            '"auto", "off" or increasing batch sizes 1..50 such as [1, 2, 4, 8, 16, 32, 50]'),
        "device_buffers": (lambda v: v == "auto" or isinstance(v, bool), '"auto", true or false'),
        "cuda_graphs": (lambda v: isinstance(v, bool), "true or false"),
        "shared_sessions": (lambda v: v == "auto" or isinstance(v, bool), '"auto", true or false'),
        "network_bytes": (lambda v: v == "auto" or (_is_int(v) and v >= 1 << 20), '"auto" or a byte count >= 1048576'),
        "precision": (lambda v: v is None or v in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
        "processes": (lambda v: _is_int(v) and 0 <= v <= 256, "an integer 0..256 (0 = one per core)"),
        "slots": (lambda v: _is_int(v) and 1 <= v <= 256, "an integer 1..256"),
        "max_batch": (lambda v: _is_int(v) and 1 <= v <= 50, "an integer 1..50"),
        "max_face": (lambda v: _is_int(v) and 32 <= v <= 1024, "an integer 32..1024"),
        "models_per_device": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "background_bytes": (lambda v: _is_int(v) and v >= 1 << 20, "a byte count >= 1048576"),
        "max_pending": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "jpeg_quality": (lambda v: _is_int(v) and 1 <= v <= 100, "an integer 1..100"),
        "chroma_subsampling": (lambda v: v in SUBSAMPLINGS, "one of " + ", ".join(SUBSAMPLINGS)),
        "encoder": (lambda v: v in ENCODERS, "one of " + ", ".join(ENCODERS)),
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
                "streams": StreamsConfig, "scheduling": SchedulingConfig, "client": ClientConfig}
    kwargs: dict[str, Any] = {"source": source}
    for key, value in data.items():
        if key == "output" and isinstance(value, dict) and REMOVED_OUTPUT_KEY in value:
            value = {k: v for k, v in value.items() if k != REMOVED_OUTPUT_KEY}
            logging.getLogger("engine.config").warning(
                "output.fastdct is ignored: it never changed a byte (simplejpeg's encoder writes the same JPEG "
                "either way) and was removed on 2026-12-05; delete it from your config")
        if key in sections:
            kwargs[key] = _build(sections[key], value, key)
        elif key == "quotas":
            kwargs[key] = _build_quotas(value)
        elif key == "models_root":
            _check(isinstance(value, str) and value != "", key, "a folder path", value)
            kwargs[key] = value
        elif key == "models":
            _check(isinstance(value, dict), key, "a table of [models.NAME] sections", value)
            kwargs[key] = {name: _build(ModelConfig, t, f"models.{name}", name=name) for name, t in value.items()}
        else:
            raise ConfigError(f"{key}: unknown key (known: {', '.join([*sections, 'quotas', 'models_root', 'models'])})")
    cfg = EngineConfig(**kwargs)
    sc = cfg.server
    if bool(sc.curve_secret_key) != bool(sc.curve_clients):
        missing = "server.curve_clients" if sc.curve_secret_key else "server.curve_secret_key"
        raise ConfigError(f"{missing}: required with "
                          f"{'server.curve_secret_key' if sc.curve_secret_key else 'server.curve_clients'} "
                          "(CURVE needs the server's secret certificate and the folder of authorised client keys)")
    if isinstance(cfg.gpu.devices, list):
        cfg = replace(cfg, gpu=replace(cfg.gpu, devices=tuple(cfg.gpu.devices)))
    if isinstance(cfg.gpu.batch_buckets, list):
        cfg = replace(cfg, gpu=replace(cfg.gpu, batch_buckets=tuple(cfg.gpu.batch_buckets)))
    _cross_check(cfg)
    return cfg


def _build_quotas(table: Any) -> QuotasConfig:
    _check(isinstance(table, dict), "quotas", "a table", table)
    table = dict(table)
    clients = table.pop("clients", {})
    _check(isinstance(clients, dict), "quotas.clients", "a table of [quotas.clients.NAME] sections", clients)
    base = _build(QuotasConfig, table, "quotas", clients={})
    overrides = {name: _build(QuotaOverride, t, f"quotas.clients.{name}", name=name) for name, t in clients.items()}
    return replace(base, clients=overrides)
def _cross_check(cfg: EngineConfig) -> None:
    """Rules that involve two keys."""
    g = cfg.gpu
    if isinstance(g.batch_buckets, tuple) and g.batch_buckets[-1] > cfg.ring.max_batch:
        raise ConfigError(f"gpu.batch_buckets: {g.batch_buckets[-1]} is larger than ring.max_batch "
                          f"({cfg.ring.max_batch}); a ring slot holds at most that many frames")
    if not g.io_binding and g.device_buffers is True:
        raise ConfigError("gpu.device_buffers: true needs gpu.io_binding = true (the buffers are bound)")
    if not g.io_binding and g.cuda_graphs:
        raise ConfigError("gpu.cuda_graphs: true needs gpu.io_binding = true (a graph replays bound buffers)")
    if not g.io_binding and g.shared_sessions is True:
        raise ConfigError("gpu.shared_sessions: true needs gpu.io_binding = true (the weights are bound per run)")
    if g.device_buffers is False and g.cuda_graphs:
        raise ConfigError("gpu.cuda_graphs: true needs gpu.device_buffers (a graph replays fixed device buffers)")
