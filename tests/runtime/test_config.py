"""engine/runtime/config.py: defaults, the repository's engine.toml, every kind of bad value, overrides, derived values."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from engine.runtime import config as C
from engine.runtime.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str, name: str = "engine.toml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _error(tmp_path: Path, text: str, *words: str) -> str:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# -- defaults and the repository's file --------------------------------------------------------
def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tmp_path = tmp_path.resolve()
    cfg = load_config(None)
    assert cfg == C.EngineConfig()
    assert cfg.source == ""
    assert cfg.server.front == "tcp://127.0.0.1:5555"
    assert cfg.server.instance == "lse"
    assert cfg.gpu.devices == "auto"
    assert cfg.gpu.slots_per_device == "auto" and cfg.gpu.slots(gpu=True) == 2 and cfg.gpu.slots(gpu=False) == 1
    assert cfg.gpu.batch_buckets == "auto" and cfg.gpu.device_buffers == "auto" and cfg.gpu.cuda_graphs is False
    assert cfg.gpu.precision == "fp32" and cfg.precision("anyone") == "fp32"
    assert cfg.cache_dir == tmp_path / ".run" / "cache"
    assert cfg.ring == C.RingConfig(slots=4, max_batch=50, max_face=320)
    assert cfg.output.jpeg_quality == 75 and cfg.output.chroma_subsampling == "420"
    assert cfg.output.encoder == "splice"
    assert cfg.capacity.background_bytes == 8 << 30
    assert cfg.models == {}
    assert cfg.root_dir == tmp_path
    assert cfg.models_dir == tmp_path / "models"
    assert cfg.run_path == tmp_path / ".run"
    assert cfg.control_endpoint == f"ipc://{tmp_path / '.run' / 'control.sock'}"
    assert cfg.backend_endpoint == f"ipc://{tmp_path / '.run' / 'backend.sock'}"


def test_every_default_passes_validation() -> None:
    # the defaults written in the dataclasses must satisfy the rules load_config applies to a file
    for name, cls in [("server", C.ServerConfig), ("gpu", C.GpuConfig), ("compositor", C.CompositorConfig),
                      ("ring", C.RingConfig), ("capacity", C.CapacityConfig), ("output", C.OutputConfig),
                      ("supervision", C.SupervisionConfig)]:
        C._validate(cls(), name)
    C._validate(C.ModelConfig(name="m"), "models.m")


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    p = _write(tmp_path, "# nothing\n")
    cfg = load_config(p)
    assert cfg == dataclasses.replace(C.EngineConfig(), source=str(p.resolve()))


def test_repository_engine_toml() -> None:
    path = REPO / "engine.toml"
    cfg = load_config(path)
    assert cfg.source == str(path.resolve())
    assert cfg.root_dir == REPO
    assert cfg.models_dir == REPO / cfg.models_root
    for name, m in cfg.models.items():
        assert isinstance(m, C.ModelConfig)
        assert m.name == name
        assert m.paste in C.PASTE_MODES and m.wrap in C.WRAP_MODES
    assert 1 <= cfg.ring.max_batch <= 50
    assert cfg.output.chroma_subsampling in C.SUBSAMPLINGS
    assert isinstance(cfg.gpu.devices, (str, tuple))


def test_config_is_frozen() -> None:
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ring.slots = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.models_root = "x"  # type: ignore[misc]


def test_full_file(tmp_path: Path) -> None:
    p = _write(tmp_path, """
models_root = "/srv/avatars"
[server]
front = "tcp://0.0.0.0:6000"
control = "tcp://127.0.0.1:6001"
run_dir = "/tmp/lse-run"
instance = "eng2"
log_level = "DEBUG"
[gpu]
devices = [0, 1]
slots_per_device = 2
intra_op_threads = 4
io_binding = false
[compositor]
processes = 3
[ring]
slots = 8
max_batch = 1
max_face = 32
[capacity]
models_per_device = 2
network_bytes = 2097152
background_bytes = 1048576
max_pending = 0
[output]
jpeg_quality = 100
chroma_subsampling = "444"
fastdct = false
encoder = "full"
[supervision]
ready_timeout_s = 0.5
heartbeat_timeout_s = 10
max_restarts = 0
restart_window_s = 1.5
request_timeout_s = 30
[models.alice]
path = "people/alice"
preload = true
paste = "stretch"
wrap = "modulo"
preferred_gpu = 1
[models.bob]
""")
    cfg = load_config(p)
    assert cfg.server == C.ServerConfig("tcp://0.0.0.0:6000", "tcp://127.0.0.1:6001", "/tmp/lse-run", "eng2", "DEBUG")
    assert cfg.gpu == C.GpuConfig((0, 1), 2, 4, False, "auto", "auto", False, "fp32", "auto")
    assert isinstance(cfg.gpu.devices, tuple)
    assert cfg.gpu_devices() == (0, 1)
    assert cfg.compositor_count() == 3
    assert cfg.ring == C.RingConfig(8, 1, 32)
    assert cfg.capacity == C.CapacityConfig(2, 2 << 20, 1 << 20, 0)
    assert cfg.output == C.OutputConfig(100, "444", "full")      # output.fastdct: ignored (removed)
    assert cfg.supervision == C.SupervisionConfig(0.5, 10, 0, 1.5, 30)
    assert cfg.models["alice"] == C.ModelConfig("alice", "people/alice", True, "stretch", "modulo", 1)
    assert cfg.models["bob"] == C.ModelConfig("bob")
    assert cfg.model("alice") is cfg.models["alice"]
    assert cfg.model("carol") == C.ModelConfig("carol")
    assert cfg.models_dir == Path("/srv/avatars")
    assert cfg.run_path == Path("/tmp/lse-run")
    assert cfg.control_endpoint == "tcp://127.0.0.1:6001"
    assert cfg.backend_endpoint == "ipc:///tmp/lse-run/backend.sock"


def test_gpu_keys_of_issue_7(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, """
[gpu]
slots_per_device = 3
batch_buckets = [1, 2, 4, 8, 16, 32, 50]
device_buffers = true
cuda_graphs = true
precision = "fp16"
[models.a]
precision = "fp32"
[models.b]
"""))
    assert cfg.gpu.slots(gpu=True) == cfg.gpu.slots(gpu=False) == 3
    assert cfg.gpu.batch_buckets == (1, 2, 4, 8, 16, 32, 50)          # a tuple, like devices
    assert cfg.gpu.device_buffers is True and cfg.gpu.cuda_graphs is True
    assert cfg.precision("a") == "fp32" and cfg.precision("b") == "fp16" and cfg.precision("c") == "fp16"
    assert load_config(None, {"gpu.batch_buckets": "off"}).gpu.batch_buckets == "off"


def test_shared_sessions_resolve_per_provider() -> None:
    """``gpu.shared_sessions``: "auto" is on for CUDA only, and off there with CUDA graphs (they replay
    fixed weights) or without IO binding (the weights are bound per run); true and false are kept."""
    def gpu(**keys):
        return load_config(None, {f"gpu.{k}": v for k, v in keys.items()}).gpu
    auto = gpu()
    assert auto.shared_sessions == "auto"
    assert auto.shared(gpu=True) is True and auto.shared(gpu=False) is False
    assert gpu(cuda_graphs=True).shared(gpu=True) is False
    assert gpu(io_binding=False).shared(gpu=True) is False
    assert gpu(shared_sessions=True).shared(gpu=False) is True       # asked for: on the CPU provider too
    assert gpu(shared_sessions=True, cuda_graphs=True).shared(gpu=True) is True
    assert gpu(shared_sessions=False).shared(gpu=True) is False
    assert load_config(None, {}).capacity.network_bytes == "auto"
    assert load_config(None, {"capacity.network_bytes": 1 << 30}).capacity.network_bytes == 1 << 30


# -- bad values ----------------------------------------------------------------------------------
BAD = [
    # (toml text, dotted key, distinctive word)
    ("[ring]\nmax_batch = 0", "ring.max_batch", "expected"),
    ("[ring]\nmax_batch = 51", "ring.max_batch", "expected"),
    ("[ring]\nmax_batch = 8.0", "ring.max_batch", "expected"),
    ("[ring]\nmax_batch = true", "ring.max_batch", "expected"),
    ("[ring]\nslots = 0", "ring.slots", "expected"),
    ("[ring]\nmax_face = 16", "ring.max_face", "expected"),
    ("[output]\njpeg_quality = 101", "output.jpeg_quality", "expected"),
    ("[output]\njpeg_quality = 0", "output.jpeg_quality", "expected"),
    ('[output]\nchroma_subsampling = "400"', "output.chroma_subsampling", "expected"),
    ("[output]\nchroma_subsampling = 420", "output.chroma_subsampling", "expected"),
    ('[output]\nencoder = "turbo"', "output.encoder", "expected one of splice, full"),
    ('[gpu]\ndevices = "all"', "gpu.devices", "expected"),
    ("[gpu]\ndevices = [-1]", "gpu.devices", "expected"),
    ("[gpu]\ndevices = [0, true]", "gpu.devices", "expected"),
    ('[gpu]\ndevices = ["0"]', "gpu.devices", "expected"),
    ("[gpu]\ndevices = 0", "gpu.devices", "expected"),
    ("[gpu]\nslots_per_device = 0", "gpu.slots_per_device", "expected"),
    ("[gpu]\nio_binding = 1", "gpu.io_binding", "expected"),
    ('[gpu]\nslots_per_device = "two"', "gpu.slots_per_device", "expected"),
    ('[gpu]\nbatch_buckets = "on"', "gpu.batch_buckets", "expected"),
    ("[gpu]\nbatch_buckets = []", "gpu.batch_buckets", "expected"),
    ("[gpu]\nbatch_buckets = [4, 2]", "gpu.batch_buckets", "increasing"),
    ("[gpu]\nbatch_buckets = [1, 1, 2]", "gpu.batch_buckets", "increasing"),
    ("[gpu]\nbatch_buckets = [0, 8]", "gpu.batch_buckets", "expected"),
    ("[gpu]\nbatch_buckets = [1, 64]", "gpu.batch_buckets", "expected"),
    ("[gpu]\nbatch_buckets = [1, 2.0]", "gpu.batch_buckets", "expected"),
    ("[gpu]\nbatch_buckets = [1, 40]\n[ring]\nmax_batch = 32", "gpu.batch_buckets", "ring.max_batch"),
    ('[gpu]\ndevice_buffers = "yes"', "gpu.device_buffers", "expected"),
    ("[gpu]\ncuda_graphs = 1", "gpu.cuda_graphs", "expected"),
    ("[gpu]\ncuda_graphs = true\nio_binding = false", "gpu.cuda_graphs", "io_binding"),
    ("[gpu]\ncuda_graphs = true\ndevice_buffers = false", "gpu.cuda_graphs", "device_buffers"),
    ("[gpu]\ndevice_buffers = true\nio_binding = false", "gpu.device_buffers", "io_binding"),
    ('[gpu]\nprecision = "fp8"', "gpu.precision", "expected"),
    ('[models.x]\nprecision = "half"', "models.x.precision", "fp32, fp16"),
    ("[compositor]\nprocesses = -1", "compositor.processes", "expected"),
    ('[server]\nfront = "localhost:5555"', "server.front", "expected"),
    ('[server]\ncontrol = "control.sock"', "server.control", "expected"),
    ('[server]\ninstance = "lse-1"', "server.instance", "expected"),
    ('[server]\ninstance = ""', "server.instance", "expected"),
    ('[server]\ninstance = "a234567890abcdefg"', "server.instance", "expected"),
    ('[server]\nlog_level = "debug"', "server.log_level", "expected"),
    ("[server]\nrun_dir = 3", "server.run_dir", "expected"),
    ("[capacity]\nbackground_bytes = 1000", "capacity.background_bytes", "expected"),
    ("[capacity]\nmodels_per_device = 0", "capacity.models_per_device", "expected"),
    ("[capacity]\nmax_pending = -1", "capacity.max_pending", "expected"),
    ("[supervision]\nready_timeout_s = 0", "supervision.ready_timeout_s", "expected"),
    ("[supervision]\nheartbeat_timeout_s = -5", "supervision.heartbeat_timeout_s", "expected"),
    ('[supervision]\nrequest_timeout_s = "60"', "supervision.request_timeout_s", "expected"),
    ("[supervision]\nrestart_window_s = nan", "supervision.restart_window_s", "expected"),
    ("[supervision]\nmax_restarts = -1", "supervision.max_restarts", "expected"),
    ('[models.x]\npaste = "blend"', "models.x.paste", "expected"),
    ('[models.x]\nwrap = "mirror"', "models.x.wrap", "expected"),
    ("[models.x]\npreload = 1", "models.x.preload", "expected"),
    ("[models.x]\npath = 5", "models.x.path", "expected"),
    ("[models.x]\npreferred_gpu = -1", "models.x.preferred_gpu", "expected"),
    ("[models.x]\npreferred_gpu = true", "models.x.preferred_gpu", "expected"),
    ('[models.""]\npaste = "stretch"', "models..name", "expected"),
    ('models_root = ""', "models_root", "expected"),
    ("models_root = 3", "models_root", "expected"),
    ("models = 3", "models", "expected"),
    ("models = [1]", "models", "expected"),
    ("[models]\nx = 3", "models.x", "expected"),
    ("ring = 4", "ring", "expected"),
    ("server = [1, 2]", "server", "expected"),
    ("[ring]\nslot = 4", "ring.slot", "unknown"),
    ("[output]\nquality = 70", "output.quality", "unknown"),
    ("[models.x]\nname = \"y\"", "models.x.name", "unknown"),
    ("rings = 4", "rings", "unknown"),
    ("[engine]\nslots = 4", "engine", "unknown"),
]


@pytest.mark.parametrize("text,key,word", BAD, ids=[f"{k}:{t.splitlines()[-1]}" for t, k, word in BAD])
def test_bad_value(tmp_path: Path, text: str, key: str, word: str) -> None:
    msg = _error(tmp_path, text + "\n", word)
    assert msg.startswith(key + ":"), msg


def test_unknown_key_lists_known_keys(tmp_path: Path) -> None:
    msg = _error(tmp_path, "[ring]\nslot = 4\n", "ring.slot", "unknown", "slots", "max_batch", "max_face")
    assert "known" in msg
    msg = _error(tmp_path, "[models.x]\nname = \"y\"\n", "models.x.name", "unknown")
    assert "paste" in msg and "name," not in msg
    _error(tmp_path, "rings = 4\n", "rings", "unknown", "ring", "models_root")


def test_message_shows_the_bad_value(tmp_path: Path) -> None:
    _error(tmp_path, "[ring]\nmax_batch = 51\n", "ring.max_batch", "expected an integer 1..50", "got 51")
    _error(tmp_path, '[models.x]\npaste = "blend"\n', "models.x.paste", "synctalk", "stretch", "'blend'")


def test_seconds_reject_booleans(tmp_path: Path) -> None:
    accepted = []
    for key in ("ready_timeout_s", "heartbeat_timeout_s", "restart_window_s", "request_timeout_s"):
        p = _write(tmp_path, f"[supervision]\n{key} = true\n")
        try:
            load_config(p)
        except ConfigError as e:
            assert f"supervision.{key}" in str(e)
            continue
        accepted.append(f"supervision.{key}")
    if accepted:
        pytest.fail(f"ENGINE BUG engine/runtime/config.py _validate: {', '.join(accepted)} = true is accepted (as True, "
                    "i.e. 1 s): the rules `isinstance(v, (int, float)) and v > 0` let bool through, unlike the "
                    "integer keys, which use _is_int")


def test_invalid_toml(tmp_path: Path) -> None:
    p = _write(tmp_path, "[ring\nslots = 4\n")
    msg = _error(tmp_path, "[ring\nslots = 4\n", "TOML")
    assert str(p) in msg
    _error(tmp_path, "[ring]\nslots = 4\nslots = 5\n", "TOML")
    _error(tmp_path, "x = \n", "TOML")


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope" / "engine.toml"
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert "not found" in str(info.value)
    assert str(p) in str(info.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_config_from_dict_directly() -> None:
    cfg = C.config_from_dict({"ring": {"slots": 2}})
    assert cfg.ring.slots == 2 and cfg.source == ""
    with pytest.raises(ConfigError, match=r"^ring\.slots: expected"):
        C.config_from_dict({"ring": {"slots": 0}})


# -- overrides -----------------------------------------------------------------------------------
def test_overrides_without_file() -> None:
    cfg = load_config(None, {"ring.max_batch": 8, "models.x.paste": "stretch", "models_root": "/m",
                             "gpu.devices": [2]})
    assert cfg.ring.max_batch == 8
    assert cfg.ring.slots == 4
    assert cfg.models["x"].paste == "stretch" and cfg.models["x"].name == "x"
    assert cfg.models_dir == Path("/m")
    assert cfg.gpu.devices == (2,)


def test_overrides_replace_file_values(tmp_path: Path) -> None:
    p = _write(tmp_path, "[ring]\nslots = 2\nmax_batch = 10\n[models.demo]\npaste = \"synctalk\"\n")
    cfg = load_config(p, {"ring.slots": 6, "models.demo.wrap": "modulo", "output.jpeg_quality": 90})
    assert cfg.ring.slots == 6
    assert cfg.ring.max_batch == 10          # untouched key of the same section kept
    assert cfg.models["demo"].paste == "synctalk" and cfg.models["demo"].wrap == "modulo"
    assert cfg.output.jpeg_quality == 90
    assert cfg.source == str(p.resolve())


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"ring\.max_batch.*expected"):
        load_config(None, {"ring.max_batch": 0})
    with pytest.raises(ConfigError, match=r"ring\.bogus.*unknown"):
        load_config(None, {"ring.bogus": 1})
    with pytest.raises(ConfigError, match=r"^nosuch: unknown"):
        load_config(None, {"nosuch": 1})


# -- derived values ------------------------------------------------------------------------------
def test_models_dir_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = _write(tmp_path, 'models_root = "avatars"\n', "conf/sub/engine.toml")
    cfg = load_config(p)
    assert cfg.root_dir == (tmp_path / "conf" / "sub").resolve()
    assert cfg.models_dir == (tmp_path / "conf" / "sub" / "avatars").resolve()
    # a relative path to the file gives the same result
    rel = load_config(os.path.relpath(p, elsewhere))
    assert rel.models_dir == cfg.models_dir
    assert rel.source == cfg.source


def test_absolute_models_root_is_kept(tmp_path: Path) -> None:
    p = _write(tmp_path, f'models_root = "{tmp_path / "abs"}"\n', "c/engine.toml")
    assert load_config(p).models_dir == tmp_path / "abs"


def test_control_endpoint_default_is_in_run_dir(tmp_path: Path) -> None:
    p = _write(tmp_path, "[server]\nrun_dir = \"state/run\"\n", "c/engine.toml")
    cfg = load_config(p)
    run = (tmp_path / "c" / "state" / "run").resolve()
    assert cfg.run_path == run
    assert cfg.control_endpoint == f"ipc://{run / 'control.sock'}"
    assert cfg.backend_endpoint == f"ipc://{run / 'backend.sock'}"
    # run_dir "" means ./.run next to the file
    cfg = load_config(_write(tmp_path, "[server]\nrun_dir = \"\"\n", "d/engine.toml"))
    assert cfg.control_endpoint == f"ipc://{(tmp_path / 'd').resolve() / '.run' / 'control.sock'}"
    # an explicit control endpoint wins
    cfg = load_config(_write(tmp_path, "[server]\ncontrol = \"ipc:///tmp/x.sock\"\n", "e/engine.toml"))
    assert cfg.control_endpoint == "ipc:///tmp/x.sock"


def test_compositor_count(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(None, {"compositor.processes": 5}).compositor_count() == 5
    cfg = load_config(None, {"compositor.processes": 0})
    assert cfg.compositor_count() == max(1, os.cpu_count() or 1)
    monkeypatch.setattr(C.os, "cpu_count", lambda: 12)
    assert cfg.compositor_count() == 12
    monkeypatch.setattr(C.os, "cpu_count", lambda: None)
    assert cfg.compositor_count() == 1


def test_gpu_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(None, {"gpu.devices": []}).gpu_devices() == ()
    assert load_config(None, {"gpu.devices": [1, 0]}).gpu_devices() == (1, 0)
    auto = load_config(None)
    monkeypatch.setattr(C, "detect_gpus", lambda: (0, 1, 2))
    assert auto.gpu_devices() == (0, 1, 2)


def test_detect_gpus_respects_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    n = len(C.detect_gpus())
    assert C.detect_gpus() == tuple(range(n))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert C.detect_gpus() == ()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert C.detect_gpus() == ()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert C.detect_gpus() == tuple(range(min(n, 1)))


def test_readme_lists_every_configuration_key():
    """Docs are part of the product: the README's configuration table names every key."""
    import dataclasses
    from pathlib import Path

    from engine.runtime.config import EngineConfig, ModelConfig
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = []
    for section in dataclasses.fields(EngineConfig):
        if section.name in ("models", "source"):
            continue
        if section.name == "models_root":
            keys = ["`models_root`"]
        else:
            keys = [f"`{section.name}.{f.name}`" for f in dataclasses.fields(section.default_factory())]
        for key in keys:
            short = "/ `" + key.strip("`").split(".")[-1] + "`"       # `a.x` / `y` rows name two keys
            table = "`[" + key.strip("`") + ".NAME]`"                 # a table of named sections
            if key not in readme and short not in readme and table not in readme:
                missing.append(key)
    for f in dataclasses.fields(ModelConfig):
        if f.name != "name" and f"`[models.NAME]` `{f.name}`" not in readme:
            missing.append(f"[models.NAME] {f.name}")
    assert not missing, f"README configuration table lacks {missing}"


def test_the_removed_fastdct_key_is_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    p = tmp_path / "e.toml"
    p.write_text("[output]\nfastdct = false\njpeg_quality = 80\n")
    cfg = load_config(p)
    assert cfg.output.jpeg_quality == 80 and not hasattr(cfg.output, "fastdct")
    assert "output.fastdct is ignored" in caplog.text
