"""The inference core: one Run per batch straight into the ring's memory, LRU of sessions, buckets."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from engine.worker.buckets import AUTO_BUCKETS
from engine.worker.inference import InferenceCore, InferenceError


@pytest.fixture
def demo_onnx(models_root):
    return models_root / "demo" / "checkpoint" / "model_best.onnx"


def inputs(b: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.random((b, 6, 320, 320), np.float32), rng.standard_normal((b, 32, 16, 16)).astype(np.float32))


@pytest.mark.parametrize("io_binding", [True, False])
def test_run_writes_the_batch_output_in_place(demo_onnx, io_binding):
    core = InferenceCore(None, io_binding=io_binding)
    m = core.load("demo", demo_onnx)
    image, audio = inputs(5)
    out = np.full((5, 3, 320, 320), -1, np.float32)
    core.run(m, image, audio, out)
    ref = ort.InferenceSession(str(demo_onnx), providers=["CPUExecutionProvider"]).run(
        None, {"input": image, "audio": audio})[0]
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert m.runs == 1                                       # one Run for the whole batch


def test_sessions_are_least_recently_used(demo_onnx):
    core = InferenceCore(None, capacity=2)
    for name in ("a", "b", "a", "c"):
        core.load(name, demo_onnx)
    assert list(core.models) == ["a", "c"]
    assert core.unload("a") and not core.unload("a")


def test_exact_sizes_on_the_cpu_by_default_and_buckets_when_asked(demo_onnx):
    cpu = InferenceCore(None)
    assert cpu.load("demo", demo_onnx).sizes is None                      # "auto" on the CPU provider
    assert InferenceCore(None, buckets="off").load("demo", demo_onnx).sizes is None
    core = InferenceCore(None, buckets=(1, 2, 4, 8))
    m = core.load("demo", demo_onnx)
    assert m.sizes == (1, 2, 4, 8) and m.shapes == {1, 2, 4, 8}          # every size warmed up at load
    assert core.rows(m, 13) == 16 and core.rows(m, 50) == 50             # 8 + 5->8; past the ring: scratch
    gpu = InferenceCore(None, buckets="auto", max_batch=30)
    gpu.device = 0                                           # the rule alone, without a CUDA device
    assert gpu.sizes_for(m.graph) == (1, 2, 4, 8, 16, 24, 30) and max(AUTO_BUCKETS) == 50


def test_bucketed_runs_equal_exact_runs_and_count_no_cold_run(demo_onnx):
    image, audio = inputs(13)
    plain = InferenceCore(None)
    ref = np.empty((13, 3, 320, 320), np.float32)
    plain.run(plain.load("demo", demo_onnx), image, audio, ref)
    assert plain.cold_runs == 1 and plain.stats()["cold_shapes"] == ["demo:13"]   # exact sizes: 13 is new
    core = InferenceCore(None, buckets=(1, 2, 4, 8))
    m = core.load("demo", demo_onnx)
    for n in (13, 1, 7, 8, 3):
        rows = core.rows(m, n)
        img = np.zeros((rows, 6, 320, 320), np.float32)
        aud = np.zeros((rows, 32, 16, 16), np.float32)
        img[:n], aud[:n] = image[:n], audio[:n]
        out = np.full((rows, 3, 320, 320), -1, np.float32)
        core.run(m, img, aud, out, n)
        np.testing.assert_allclose(out[:n], ref[:n], atol=1e-6)
    assert core.cold_runs == 0
    assert core.stats()["shapes"]["demo"] == [1, 2, 4, 8]


def test_a_size_past_the_callers_rows_runs_from_scratch_rows(demo_onnx):
    core = InferenceCore(None, buckets=(4,))
    m = core.load("demo", demo_onnx)
    image, audio = inputs(6)                                  # 4 + 2 padded to 4: rows 6..7 are not given
    out = np.empty((6, 3, 320, 320), np.float32)
    core.run(m, image, audio, out)
    ref = InferenceCore(None)
    ref_out = np.empty_like(out)
    ref.run(ref.load("demo", demo_onnx), image, audio, ref_out)
    np.testing.assert_allclose(out, ref_out, atol=1e-6)
    assert core.cold_runs == 0 and m.runs == 2


def test_audio_encoder_padding_does_not_change_features(models_root):
    path = str(models_root / "audio_encoder.onnx")
    windows = np.random.default_rng(1).uniform(-4, 4, (23, 1, 80, 16)).astype(np.float32)
    plain = InferenceCore(None).encode_audio(path, windows)
    core = InferenceCore(None, buckets=(1, 2, 4, 8))             # bucketed network: bucketed encoder
    enc = core.load_encoder(path)
    assert enc.sizes[0] == 16 and enc.sizes[-1] >= 50 * 16 and enc.shapes == set(enc.sizes)
    padded = core.encode_audio(path, windows)                # 23 windows run as 32
    assert plain.shape == padded.shape == (23, 512)
    np.testing.assert_array_equal(plain, padded)
    assert core.cold_runs == 0


@pytest.mark.skipif(bool(__import__("engine.runtime.config").runtime.config.detect_gpus()), reason="this machine has a GPU")
def test_unusable_gpu_fails_at_construction():
    with pytest.raises(InferenceError, match="GPU 0"):
        InferenceCore(0)


def test_fixed_batch_graph_runs_in_pieces(tmp_path, demo_onnx):
    import onnx
    m = onnx.load(str(demo_onnx))
    for v in [*m.graph.input, *m.graph.output]:
        v.type.tensor_type.shape.dim[0].dim_value = 4          # exported with batch 4
    path = tmp_path / "fixed.onnx"
    onnx.save(m, str(path))
    core = InferenceCore(None)
    lm = core.load("fixed", path)
    assert lm.graph.fixed_batch == 4
    image, audio = inputs(6)                                     # 4 + 2 (padded)
    out = np.empty((6, 3, 320, 320), np.float32)
    core.run(lm, image, audio, out)
    ref = InferenceCore(None)
    ref_out = np.empty_like(out)
    ref.run(ref.load("demo", demo_onnx), image, audio, ref_out)
    np.testing.assert_allclose(out, ref_out, atol=1e-6)


def test_device_buffers_give_the_plain_runs_output(demo_onnx):
    """The per-bucket device-buffer path (CUDA's default), exercised with CPU OrtValues."""
    image, audio = inputs(11)
    ref = InferenceCore(None)
    ref_out = np.empty((11, 3, 320, 320), np.float32)
    ref.run(ref.load("demo", demo_onnx), image, audio, ref_out)
    core = InferenceCore(None, buckets=(1, 4, 8), device_buffers=True)
    m = core.load("demo", demo_onnx)
    assert m.mode == "device_buffers" and not m.bucket_modes and sorted(m.buffers.sets) == [1, 4, 8]
    rows = core.rows(m, 11)
    img, aud = np.zeros((rows, 6, 320, 320), np.float32), np.zeros((rows, 32, 16, 16), np.float32)
    img[:11], aud[:11] = image, audio
    out = np.full((rows, 3, 320, 320), -1, np.float32)
    core.run(m, img, aud, out, 11)
    np.testing.assert_allclose(out[:11], ref_out, atol=1e-6)
    assert m.buffers.readback == "update_inplace" and core.cold_runs == 0
    assert core.stats()["networks"]["demo"]["path"] == "device_buffers"


def test_a_bucket_whose_device_path_fails_its_check_falls_back(demo_onnx, monkeypatch, caplog):
    from engine.worker import device_buffers
    real = device_buffers.DeviceBuffers.run

    def wrong_for_4(self, image, audio, out, graph=None, **kw):
        real(self, image, audio, out, graph, **kw)
        if len(image) == 4:
            out += 1.0                                          # a replay that reads stale buffers, say
    monkeypatch.setattr(device_buffers.DeviceBuffers, "run", wrong_for_4)
    core = InferenceCore(None, buckets=(1, 4), device_buffers=True)
    m = core.load("demo", demo_onnx)
    assert m.bucket_modes == {4: "bind_ring"} and "batch 4" in m.fallback[0]
    assert "failed its check" in caplog.text
    image, audio = inputs(4)
    out = np.empty((4, 3, 320, 320), np.float32)
    core.run(m, image, audio, out)
    ref = ort.InferenceSession(str(demo_onnx), providers=["CPUExecutionProvider"]).run(
        None, {"input": image, "audio": audio})[0]
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert core.stats()["networks"]["demo"]["bucket_paths"] == {"4": "bind_ring"}


def test_cuda_graphs_asked_on_the_cpu_fall_back_with_a_reason(demo_onnx, caplog):
    core = InferenceCore(None, buckets=(1, 2), cuda_graphs=True)
    m = core.load("demo", demo_onnx)
    assert m.mode == "bind_ring" and m.fallback == ["CUDA graphs need the CUDA provider"]
    assert "running without them" in caplog.text
    image, audio = inputs(2)
    out = np.empty((2, 3, 320, 320), np.float32)
    core.run(m, image, audio, out)                              # serves all the same


def test_prepare_in_a_thread_while_another_network_serves(demo_onnx, models_root):
    """The worker's loader thread: prepare() touches nothing the serving thread uses."""
    import threading
    core = InferenceCore(None, buckets=(1, 2, 4))
    a = core.load("a", demo_onnx)
    box = {}
    t = threading.Thread(target=lambda: box.update(m=core.prepare("b", demo_onnx, encoder=str(
        models_root / "audio_encoder.onnx"))))
    t.start()
    image, audio = inputs(4)
    out = np.empty((4, 3, 320, 320), np.float32)
    while t.is_alive():
        core.run(a, image, audio, out)
    t.join()
    assert list(core.models) == ["a"]                           # prepared, not installed yet
    assert core.install(box["m"]) == [] and list(core.models) == ["a", "b"]
    assert str(models_root / "audio_encoder.onnx") in core.encoders
    assert core.cold_runs == 0


def test_the_serving_thread_finishes_a_network_step_by_step(demo_onnx):
    """After install, the serving thread's own first run and (CUDA) per-bucket graph capture and
    check run one step at a time. The CPU ignores gpu_graph_id, so with ``graphs`` forced on the
    steps run as plain runs: the state machine is exercised, its checks pass."""
    core = InferenceCore(None, buckets=(1, 2), device_buffers=True)
    m = core.prepare("demo", demo_onnx)
    m.buffers.graphs = True
    core.install(m)
    assert m.todo[0] == ("touch", 1, 0) and len(m.todo) == 1 + 2 * 7
    with core.lock:                                  # the loader is preparing another network: wait
        assert core.has_todo() and not core.finish_step()
    steps = 0
    while core.finish_step():
        steps += 1
    assert steps == 15 and not core.has_todo() and m.buffers.captured == {1, 2} and not m.refs
    assert core.stats()["networks"]["demo"]["graphs_captured"] == [1, 2]


def test_a_graph_whose_replay_differs_is_not_used(demo_onnx, monkeypatch):
    from engine.worker import device_buffers
    real = device_buffers.DeviceBuffers.run

    def stale_replay(self, image, audio, out, graph=None, **kw):
        real(self, image, audio, out, graph, **kw)
        if graph and len(image) == 2:
            out *= 0.5
    core = InferenceCore(None, buckets=(1, 2), device_buffers=True)
    m = core.prepare("demo", demo_onnx)
    m.buffers.graphs = True
    core.install(m)
    monkeypatch.setattr(device_buffers.DeviceBuffers, "run", stale_replay)
    while core.finish_step():
        pass
    assert m.buffers.captured == {1} and m.bucket_modes == {2: "device_buffers"}
    assert "batch 2: CUDA graph not used" in m.fallback[-1]


def test_networks_of_a_worker_share_their_device_buffers(demo_onnx, tmp_path):
    """One set of buffers per shape and bucket for all networks (a worker runs one batch at a time):
    interleaved runs of two networks stay correct."""
    import onnx

    from engine.cli.demo_networks import build_demo_network
    other = tmp_path / "other.onnx"
    m2 = build_demo_network()
    for n in m2.graph.initializer:
        if n.name == "energy/gain":                            # a different network, same shapes
            n.CopyFrom(onnx.numpy_helper.from_array(np.array(9.0, np.float32), n.name))
    onnx.save(m2, str(other))
    core = InferenceCore(None, buckets=(1, 4), device_buffers=True)
    a, b = core.load("a", demo_onnx), core.load("b", other)
    assert len(core.buffer_pool) == 3 * 2                      # image, audio, output x two buckets
    assert a.buffers.sets[4].image is b.buffers.sets[4].image
    refs = {}
    for name, path in (("a", demo_onnx), ("b", other)):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        refs[name] = sess
    image, audio = inputs(4, seed=3)
    for m in (a, b, a, b):
        out = np.empty((4, 3, 320, 320), np.float32)
        core.run(m, image, audio, out)
        ref = refs[m.name].run(None, {"input": image, "audio": audio})[0]
        np.testing.assert_allclose(out, ref, atol=1e-6)
    outs = [np.empty((4, 3, 320, 320), np.float32) for _ in range(2)]
    core.run(a, image, audio, outs[0])
    core.run(b, image, audio, outs[1])
    assert np.abs(outs[0] - outs[1]).max() > 0.01                # really two different networks
