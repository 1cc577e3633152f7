"""Shared sessions in the inference core: one session per architecture, each network's weights
bound per run; the byte budget (engine/worker/shared.py, engine/worker/budget.py)."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from engine.worker.budget import victims
from engine.worker.inference import InferenceCore
from tests.nets import make_avatar, run_own_session

BUCKETS = (1, 2, 4)


@pytest.fixture
def nets(tmp_path, models_root):
    return [make_avatar(tmp_path / "avatars", f"n{i}", 10 + i, models_root / "demo") for i in range(4)]


def inputs(b: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.random((b, 6, 320, 320), np.float32), rng.standard_normal((b, 32, 16, 16)).astype(np.float32)


def core(tmp_path, shared: bool = True, **kw) -> InferenceCore:
    kw.setdefault("buckets", BUCKETS)
    return InferenceCore(None, intra_op_threads=1, max_batch=4, cache_dir=tmp_path / "cache",
                         shared_sessions=shared, **kw)


@pytest.mark.parametrize("device_buffers", [False, True])
def test_shared_outputs_equal_their_own_sessions_at_every_bucket_fp32(tmp_path, nets, device_buffers):
    c = core(tmp_path, device_buffers=device_buffers)
    models = [c.load(f"n{i}", p) for i, p in enumerate(nets)]
    assert {m.arch.key for m in models} == {models[0].arch.key}
    assert models[0].mode == ("device_buffers" if device_buffers else "bind_ring")
    for b in (*BUCKETS, 3):                                   # 3 runs padded to the bucket of 4
        image, audio = inputs(b, b)
        outs = []
        for m, p in zip(models * 2, nets * 2):               # twice round: bindings switch networks
            out = np.full((b, 3, 320, 320), -1, np.float32)
            c.run(m, image, audio, out)
            ref = run_own_session(p, image, audio)
            assert float(np.abs(out - ref).max()) <= 1e-5, (m.name, b)
            outs.append(out)
        # each network's output differs from its neighbour's, as their weights do
        assert all(float(np.abs(outs[i] - outs[i + 1]).max()) > 0.05 for i in range(len(nets) - 1))
    assert c.cold_runs == 0


def test_shared_fp16_equals_its_own_fp16_session_within_the_error_report(tmp_path, nets, models_root):
    own = core(tmp_path, shared=False)
    shared = core(tmp_path)
    for i, p in enumerate(nets[:2]):
        a = own.load(f"n{i}", p, precision="fp16")
        m = shared.load(f"n{i}", p, precision="fp16")
        assert m.arch is not None and a.arch is None
        bound = a.fp16_error["max_abs_diff"]
        for b in BUCKETS:
            image, audio = inputs(b, 7 + b)
            out_own, out_shared = (np.empty((b, 3, 320, 320), np.float32) for _ in range(2))
            own.run(a, image, audio, out_own)
            shared.run(m, image, audio, out_shared)
            assert float(np.abs(out_shared - out_own).max()) <= 1e-3, b
            fp32 = run_own_session(p, image, audio)
            assert float(np.abs(out_shared - fp32).max()) <= 2 * bound + 1e-3, b
        assert m.fp16_error["max_abs_diff"] == pytest.approx(bound)      # measured, or its own cached figure
    # a later network of the architecture whose error nobody measured yet says so
    m = shared.load("n2", nets[2], precision="fp16")
    assert "not_measured" in m.fp16_error and "n0" in m.fp16_error["not_measured"]
    assert shared.stats()["resident"]["sessions_built"] == 1


def test_later_networks_of_an_architecture_build_no_session_and_another_architecture_gets_its_own(
        tmp_path, nets, models_root):
    c = core(tmp_path)
    first = c.load("n0", nets[0])
    assert first.load_ms > 0 and c.shared.built == 1
    first_todo = c.prepare("x", nets[0])
    assert c.shared.built == 1
    later = [c.prepare(f"n{i}", p) for i, p in enumerate(nets[1:], 1)]
    for m in later:
        c.install(m)
        assert m.todo == []                                   # no step for the serving thread either
    c.unload("x")
    assert first_todo.arch is later[0].arch
    demo = c.load("demo", models_root / "demo" / "checkpoint" / "model_best.onnx")
    assert c.shared.built == 2 and demo.arch.key != first.arch.key
    st = c.stats()
    assert st["resident"]["networks"] == 5 and st["resident"]["own_sessions"] == 0
    assert sorted(a["networks"] for a in st["architectures"].values()) == [1, 4]
    assert st["networks"]["n1"]["architecture"] == first.arch.key[:16]


def test_without_shared_sessions_each_network_has_its_own(tmp_path, nets):
    c = core(tmp_path, shared=False)
    models = [c.load(f"n{i}", p) for i, p in enumerate(nets[:2])]
    assert all(m.arch is None for m in models) and c.shared.built == 0
    assert models[0].session is not models[1].session
    assert c.stats()["resident"]["own_sessions"] == 2


def test_the_byte_budget_evicts_least_recently_used_never_busy_and_frees_the_weights(tmp_path, nets):
    c = core(tmp_path, device_buffers=True)
    m0 = c.load("n0", nets[0])
    size = m0.weight_bytes
    c.network_bytes = 2 * size + size // 2                    # room for two
    m1 = c.load("n1", nets[1])
    image, audio = inputs(2)
    c.run(m1, image, audio, np.empty((2, 3, 320, 320), np.float32))     # n1 used last; its weights bound
    gone = weakref.ref(next(iter(m0.host.values())))
    m2 = c.prepare("n2", nets[2])
    assert c.install(m2) == ["n0"]                           # least recently used
    assert list(c.models) == ["n1", "n2"] and c.evictions == 1
    del m0
    gc.collect()
    assert gone() is None, "an evicted network's weights are still referenced"
    c.run(m2, image[:1], audio[:1], np.empty((1, 3, 320, 320), np.float32))   # bucket 1 holds n2's weights
    m3 = c.prepare("n3", nets[3])
    assert c.install(m3, busy={"n1"}) == ["n2"]              # n1 has work in flight: the next one goes
    assert c.resident_bytes() <= c.network_bytes
    bound = {b: s.bound for b, s in m1.arch.buffers.sets.items()}
    assert bound[2] == m1.token and bound[1] == 0, bound     # nothing holds the evicted n2's weights
    st = c.stats()["resident"]
    assert (st["networks"], st["evictions"], st["loads"], st["budget_bytes"]) == (2, 2, 4, c.network_bytes)


def test_victims_by_count_for_own_sessions_and_by_bytes_for_all():
    class M:
        def __init__(self, name, nbytes, shared):
            self.name, self.weight_bytes, self.arch = name, nbytes, object() if shared else None
    models = {m.name: m for m in (M("a", 10, False), M("s", 10, True), M("b", 10, False))}
    assert victims(models, M("c", 10, False), capacity=2, budget=None) == ["a"]      # own sessions only
    assert victims(models, M("t", 10, True), capacity=2, budget=None) == []          # shared: no count
    assert victims(models, M("t", 10, True), capacity=9, budget=25) == ["a", "s"]   # bytes: any, LRU first
    assert victims(models, M("t", 10, True), capacity=9, budget=25, busy={"a"}) == ["s", "b"]
    assert victims(models, M("t", 10, True), capacity=9, budget=5, busy={"a", "s", "b"}) == []   # all busy: kept


def test_an_auto_network_budget_is_half_the_free_memory_shared_by_the_device_s_workers(monkeypatch):
    import sys
    from types import ModuleType, SimpleNamespace

    import psutil

    from engine.worker.budget import auto_budget
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=8 << 30))
    assert auto_budget(None, 1) == 4 << 30                       # CPU provider: half the host's free memory
    assert auto_budget(None, 2) == 2 << 30                       # shared by the device's workers
    assert auto_budget(None, 0) == 4 << 30                       # no slots counted: one
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    assert auto_budget(None, 1) == 1 << 20                       # never under 1 MiB (the configured minimum)

    nvml = ModuleType("pynvml")                                  # NVML as a driver reports a GPU's memory
    asked = []
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda i: asked.append(i) or i
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(free=(h + 1) * (40 << 30))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=8 << 30))
    assert auto_budget(1, 2) == 20 << 30 and asked == [1]        # CUDA: the GPU's free memory, not the host's

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")
    nvml.nvmlInit = no_driver
    assert auto_budget(0, 2) == 2 << 30                          # no NVML: the host's memory bounds it


def test_from_config_resolves_auto_sharing_and_budget_for_the_cpu_provider(monkeypatch):
    from types import SimpleNamespace

    import psutil

    from engine.runtime.config import load_config
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=6 << 30))
    c = InferenceCore.from_config(None, load_config(None, {}))
    assert c.sharing is False and c.network_bytes == 3 << 30   # "auto": per-network sessions, half of 6 GiB
    c = InferenceCore.from_config(None, load_config(None, {"gpu.shared_sessions": True,
                                                           "capacity.network_bytes": 5 << 20}))
    assert c.sharing is True and c.network_bytes == 5 << 20
    assert c.stats()["resident"]["shared_sessions"] is True and c.stats()["resident"]["budget_bytes"] == 5 << 20


def test_a_damaged_weights_file_falls_back_to_its_own_session_then_splits_again(tmp_path, nets):
    from engine.worker.weights import prepare
    split = prepare(nets[0], tmp_path / "cache")
    with open(split.weights_file, "r+b") as fh:
        fh.truncate(1000)
    c = core(tmp_path)
    m = c.load("n0", nets[0])
    assert m.arch is None and not split.index_file.exists()      # its own session; the bad entry gone
    again = core(tmp_path).load("n0", nets[0])
    assert again.arch is not None


def test_the_hash_that_finds_a_network_s_cache_is_kept_on_disk(tmp_path, nets):
    from engine.worker import precision
    h = precision.file_sha256(nets[0], tmp_path / "cache")
    (memo,) = (tmp_path / "cache" / "sha256").iterdir()
    assert memo.read_text() == h
    precision._hashes.clear()                                  # a new process: read from disk, not the file
    memo.write_text("f" * 64)
    assert precision.file_sha256(nets[0], tmp_path / "cache") == "f" * 64
    precision._hashes.clear()


def test_the_worker_never_evicts_a_network_with_jobs_read_ahead():
    import json

    from engine.worker.gpu_worker import GpuWorker
    w = GpuWorker.__new__(GpuWorker)                          # its bookkeeping only, no process
    w.parked = {"p": [{}]}
    w.inbox = __import__("collections").deque([json.dumps({"t": "run", "model": "x"}).encode(), b"not json",
                                               json.dumps({"t": "drop", "avatar": "y"}).encode()])
    assert w._busy() == {"p", "x"}
