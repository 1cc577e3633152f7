"""The inference core: one Run per batch straight into the ring's memory, LRU of sessions, buckets."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from engine.inference import BUCKETS, InferenceCore, InferenceError


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


def test_buckets_only_on_a_gpu():
    cpu = InferenceCore(None)
    assert [cpu.bucket(b, 50) for b in (1, 3, 9, 50)] == [1, 3, 9, 50]
    gpu = InferenceCore.__new__(InferenceCore)               # the rule alone, without a CUDA device
    gpu.device = 0
    assert [gpu.bucket(b, 50) for b in (1, 3, 9, 17, 41, 50)] == [1, 4, 16, 24, 50, 50]
    assert gpu.bucket(30, 30) == 30 and max(BUCKETS) == 50


def test_audio_encoder_padding_does_not_change_features(models_root):
    core = InferenceCore(None)
    path = str(models_root / "audio_encoder.onnx")
    windows = np.random.default_rng(1).uniform(-4, 4, (23, 1, 80, 16)).astype(np.float32)
    plain = core.encode_audio(path, windows)
    core.device = 0                                          # take the GPU path (padded to 32) on the CPU session
    padded = core.encode_audio(path, windows)
    assert plain.shape == padded.shape == (23, 512)
    np.testing.assert_array_equal(plain, padded)


@pytest.mark.skipif(bool(__import__("engine.config").config.detect_gpus()), reason="this machine has a GPU")
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
