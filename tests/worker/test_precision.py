"""engine/worker/precision.py: fp16 conversion (cached by the source's hash) and its error against fp32,
on the real-architecture bench network."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from engine.avatars.disk import read_graph
from engine.cli.demo_avatars import make_bench
from engine.worker import precision as fp16


@pytest.fixture(scope="module")
def bench(models_root) -> Path:
    """The bench avatar (SyncTalk_2D architecture and cost) beside the test demo avatar."""
    return make_bench(models_root)


def test_conversion_keeps_float32_io_and_is_cached_by_the_source_hash(bench, tmp_path):
    src = bench / "checkpoint" / "model_best.onnx"
    half = fp16.fp16_model(src, tmp_path)
    assert half == tmp_path / "fp16" / f"{fp16.file_sha256(src)}.onnx"
    assert read_graph(half) == read_graph(src)                  # same names, float32 shapes in and out
    model = onnx.load(str(half))
    weights = [init for init in model.graph.initializer if np.prod(init.dims) > 16]   # not Resize's scales
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    assert half.stat().st_size < 0.6 * src.stat().st_size        # the weights are half as large
    mtime = half.stat().st_mtime_ns
    assert fp16.fp16_model(src, tmp_path) == half and half.stat().st_mtime_ns == mtime   # converted once
    changed = tmp_path / "changed.onnx"
    m = onnx.load(str(src))
    m.doc_string = "retrained"
    onnx.save(m, str(changed))
    assert fp16.fp16_model(changed, tmp_path) != half            # new content, new conversion
    assert not list((tmp_path / "fp16").glob("*.tmp"))


def test_error_on_the_avatars_own_frames_is_small_and_measured_once(bench, models_root, tmp_path):
    src = bench / "checkpoint" / "model_best.onnx"
    encoder = models_root / "audio_encoder.onnx"
    report = fp16.error_report(src, tmp_path, bench, encoder, ["CPUExecutionProvider"], "CPUExecutionProvider")
    # the bench network's output is a sigmoid (0..1, x255 into pixels): fp16 stays within one 8-bit level
    assert 0 < report["mean_abs_diff"] < 1e-3
    assert report["mean_abs_diff"] <= report["max_abs_diff"] < 4e-3
    assert report["pixels_changed"] < 0.1
    assert report["frames"] == 8 and report["provider"] == "CPUExecutionProvider"
    again = fp16.error_report(src, tmp_path, bench, encoder, ["CPUExecutionProvider"], "CPUExecutionProvider")
    assert again == report                                        # read from the cache, not measured again
    assert fp16.cached_report(src, tmp_path, "CPUExecutionProvider")["max_abs_diff"] == report["max_abs_diff"]
    assert fp16.cached_report(src, tmp_path, "CUDAExecutionProvider") is None


def test_the_report_matches_an_independent_comparison(bench, models_root, tmp_path):
    import onnxruntime as ort
    src = bench / "checkpoint" / "model_best.onnx"
    g = read_graph(src)
    image, audio = fp16.sample_inputs(bench, g, encoder=models_root / "audio_encoder.onnx")
    assert image.shape == (8, *g.image_shape) and audio.shape == (8, *g.audio_shape)
    assert 0 <= image.min() and image.max() <= 1 and np.abs(audio).max() > 0     # real crops, real speech
    image, audio = image[:2], audio[:2]                          # two of them: the bench network is slow on a CPU
    half = fp16.fp16_model(src, tmp_path)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")   # no idle thread spinning beside other tests
    outs = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]).run(
        None, {g.image_input: image, g.audio_input: audio})[0] for p in (src, half)]
    r = fp16.measure_error(src, half, image, audio, ["CPUExecutionProvider"])
    diff = np.abs(outs[0].astype(np.float64) - outs[1])
    assert r["max_abs_diff"] == pytest.approx(diff.max(), rel=0.05, abs=1e-6)
    assert r["mean_abs_diff"] == pytest.approx(diff.mean(), rel=0.05)


def test_a_stale_lock_or_concurrent_callers_convert_once(bench, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    src = bench / "checkpoint" / "model_best.onnx"
    (tmp_path / "fp16").mkdir()
    (tmp_path / "fp16" / f"{fp16.file_sha256(src)}.lock").write_text("")      # left by a killed process
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: fp16.fp16_model(src, tmp_path), range(3)))
    assert len(set(paths)) == 1 and os.path.getsize(paths[0]) > 0
    assert sorted(p.suffix for p in (tmp_path / "fp16").iterdir()) == [".lock", ".onnx"]
