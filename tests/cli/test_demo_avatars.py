"""Tests for engine.cli.demo_avatars: layout, determinism, the two networks' contracts, ensure_avatars."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine.cli import demo_avatars as ma
from engine.cli import demo_networks as nets

FRAMES = 12
MX, MY = nets.MOUTH_CENTER_320
# Everything the demo network may change lies inside this box of the 320 face.
MOUTH_BOX = (slice(int(MY) - 50, int(MY) + 51), slice(int(MX) - 70, int(MX) + 71))


def _session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _face_input(frame: np.ndarray, rect: list[int]) -> np.ndarray:
    """The SyncTalk_2D recipe: crop, bicubic to 328, inner 320, masked copy, BGR CHW / 255."""
    x1, y1, x2, y2 = rect
    crop = cv2.resize(frame[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    face = crop[4:324, 4:324]
    masked = face.copy()
    masked[5:310, 5:315] = 0
    return np.concatenate([face, masked], axis=2).transpose(2, 0, 1).astype(np.float32) / 255.0


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    ma.make_demo(root, frames=FRAMES)
    return root


@pytest.fixture(scope="module")
def demo_model() -> onnx.ModelProto:
    return nets.build_demo_network()


@pytest.fixture(scope="module")
def bench_model() -> onnx.ModelProto:
    return nets.build_bench_network()


# ---------------------------------------------------------------------------------- frames


def test_make_demo_layout(demo_root: Path) -> None:
    avatar = demo_root / "demo"
    assert (avatar / "checkpoint" / "model_best.onnx").is_file()
    rects = json.loads((avatar / "crop_rects.json").read_text())
    frames = sorted((avatar / "frames").glob("frame_*.png"))
    assert [p.name for p in frames] == [f"frame_{i:04d}.png" for i in range(FRAMES)]
    assert len(rects) == FRAMES
    for p, rect in zip(frames, rects):
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert img.shape == (720, 1280, 3) and img.dtype == np.uint8
        x1, y1, x2, y2 = rect
        assert all(isinstance(v, int) for v in rect)
        assert x2 - x1 == y2 - y1
        assert 175 <= x2 - x1 <= 190
        assert 0 <= x1 < x2 <= 1280 and 0 <= y1 < y2 <= 720


def test_head_moves_smoothly() -> None:
    rects = np.array([ma.crop_rect(i) for i in range(100)])
    centers = (rects[:, :2] + rects[:, 2:]) / 2
    span = centers.max(axis=0) - centers.min(axis=0)
    assert span[0] >= 20 and span[1] >= 8  # it sways and bobs...
    assert np.abs(np.diff(centers, axis=0)).max() <= 5  # ...smoothly


def test_mouth_lies_where_the_demo_network_draws_it(demo_root: Path) -> None:
    avatar = demo_root / "demo"
    rects = json.loads((avatar / "crop_rects.json").read_text())
    for i in (0, FRAMES // 2, FRAMES - 1):
        frame = cv2.imread(str(avatar / "frames" / f"frame_{i:04d}.png"))
        face = (_face_input(frame, rects[i])[:3] * 255).transpose(1, 2, 0)
        band = face[:, int(MX) - 20:int(MX) + 21].mean(axis=(1, 2))  # brightness per row, centre columns
        darkest_row = int(np.argmin(band[100:300])) + 100  # the closed mouth's line
        assert abs(darkest_row - MY) <= 6, (i, darkest_row, MY)


def test_make_demo_is_deterministic(tmp_path: Path) -> None:
    ma.make_demo(tmp_path / "a", frames=FRAMES)
    first = _tree_bytes(tmp_path / "a")
    ma.make_demo(tmp_path / "a", frames=FRAMES, force=True)
    assert _tree_bytes(tmp_path / "a") == first
    assert len(first) == FRAMES + 2


# ---------------------------------------------------------------------------------- demo network


def test_demo_network_contract(demo_model: onnx.ModelProto) -> None:
    g = demo_model.graph
    assert demo_model.ir_version == 8
    assert [o.version for o in demo_model.opset_import if o.domain in ("", "ai.onnx")] == [17]

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    inits = {t.name for t in g.initializer}
    inputs = [vi for vi in g.input if vi.name not in inits]
    assert [(vi.name, dims(vi)) for vi in inputs] == [
        ("input", ["batch", 6, 320, 320]),
        ("audio", ["batch", 32, 16, 16]),
    ]
    assert [(vi.name, dims(vi)) for vi in g.output] == [("output", ["batch", 3, 320, 320])]
    for vi in [*inputs, *g.output]:
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not any(n.op_type == "Conv" for n in g.node)


@pytest.mark.parametrize("batch", [1, 5])
def test_demo_network_runs(demo_model: onnx.ModelProto, demo_root: Path, batch: int) -> None:
    avatar = demo_root / "demo"
    rects = json.loads((avatar / "crop_rects.json").read_text())
    x = np.stack([
        _face_input(cv2.imread(str(avatar / "frames" / f"frame_{i:04d}.png")), rects[i]) for i in range(batch)
    ])
    audio = np.random.default_rng(batch).standard_normal((batch, 32, 16, 16)).astype(np.float32)
    (out,) = _session(demo_model).run(None, {"input": x, "audio": audio})
    assert out.shape == (batch, 3, 320, 320) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_demo_network_mouth_follows_audio(demo_model: onnx.ModelProto, demo_root: Path) -> None:
    avatar = demo_root / "demo"
    rects = json.loads((avatar / "crop_rects.json").read_text())
    face = _face_input(cv2.imread(str(avatar / "frames" / "frame_0000.png")), rects[0])
    levels = [0.0, 0.1, 0.3, 0.6, 1.0, 2.0]
    noise = np.random.default_rng(7).standard_normal((32, 16, 16)).astype(np.float32)
    x = np.repeat(face[None], len(levels), axis=0)
    audio = np.stack([noise * np.float32(k) for k in levels])
    (out,) = _session(demo_model).run(None, {"input": x, "audio": audio})
    ref = face[:3]

    np.testing.assert_array_equal(out[0], ref)  # silence: the reference face, untouched
    outside = np.ones((320, 320), bool)
    outside[MOUTH_BOX] = False
    for o in out:
        np.testing.assert_array_equal(o[:, outside], ref[:, outside])
    darkness = [float(o[:, MOUTH_BOX[0], MOUTH_BOX[1]].mean()) for o in out]
    assert all(a > b for a, b in zip(darkness, darkness[1:])), darkness
    assert darkness[0] - darkness[-1] > 0.08  # clearly darker when loud
    # A wide-open mouth at typical feature magnitude (~1): its centre is dark.
    assert out[4, :, int(MY) - 5:int(MY) + 6, int(MX) - 5:int(MX) + 6].max() < 0.2


def test_demo_network_batch_items_are_independent(demo_model: onnx.ModelProto) -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (4, 6, 320, 320)).astype(np.float32)
    audio = (rng.standard_normal((4, 32, 16, 16)) * np.array([0, 0.3, 1, 3])[:, None, None, None]).astype(
        np.float32)
    sess = _session(demo_model)
    (batched,) = sess.run(None, {"input": x, "audio": audio})
    for i in range(4):
        (single,) = sess.run(None, {"input": x[i:i + 1], "audio": audio[i:i + 1]})
        np.testing.assert_allclose(batched[i], single[0], rtol=0, atol=1e-6)
    # Changing one item's audio changes only that item.
    audio2 = audio.copy()
    audio2[1] *= 3
    (changed,) = sess.run(None, {"input": x, "audio": audio2})
    assert not np.allclose(changed[1], batched[1])
    for i in (0, 2, 3):
        np.testing.assert_array_equal(changed[i], batched[i])


# ---------------------------------------------------------------------------------- bench network


def test_bench_network_cost(bench_model: onnx.ModelProto) -> None:
    params, macs = nets.count_cost(bench_model)
    assert abs(params - 12.2e6) / 12.2e6 < 0.10, params
    assert abs(macs - 4.9e9) / 4.9e9 < 0.10, macs
    ops = {n.op_type for n in bench_model.graph.node}
    assert {"Conv", "Resize", "Concat", "Sigmoid"} <= ops and "BatchNormalization" not in ops
    resizes = [n for n in bench_model.graph.node if n.op_type == "Resize"]
    assert len(resizes) == 5
    assert bench_model.ir_version == 8


def test_bench_network_runs(bench_model: onnx.ModelProto) -> None:
    rng = np.random.default_rng(11)
    x = rng.uniform(0, 1, (2, 6, 320, 320)).astype(np.float32)
    audio = rng.standard_normal((2, 32, 16, 16)).astype(np.float32)
    sess = _session(bench_model, threads=2)
    assert [i.name for i in sess.get_inputs()] == ["input", "audio"]
    (out,) = sess.run(None, {"input": x, "audio": audio})
    assert out.shape == (2, 3, 320, 320)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.std() > 0.05  # varies, not saturated or constant
    assert ((out > 0.02) & (out < 0.98)).mean() > 0.9
    assert not np.allclose(out[0], out[1])


def test_count_cost_of_a_tiny_graph() -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    m = numpy_helper.from_array(np.ones((4, 5), np.float32), "m")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("MatMul", ["y", "m"], ["z"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 8, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [w, bias, m],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    params, macs = nets.count_cost(model)
    assert params == 4 * 2 * 9 + 4 + 4 * 5
    assert macs == 4 * 2 * 9 * 8 * 4 + 4 * 8 * 4 * 5


# ---------------------------------------------------------------------------------- ensure_avatars


def test_ensure_avatars_creates_only_what_is_missing(tmp_path: Path) -> None:
    ma.ensure_avatars(tmp_path, frames=FRAMES)
    demo, bench = tmp_path / "demo", tmp_path / "bench"
    for avatar in (demo, bench):
        assert (avatar / "checkpoint" / "model_best.onnx").is_file()
        assert len(json.loads((avatar / "crop_rects.json").read_text())) == FRAMES
    assert (bench / "frames").is_symlink()
    assert os.readlink(bench / "frames") == os.path.join("..", "demo", "frames")
    assert len(list((bench / "frames").glob("frame_*.png"))) == FRAMES

    frame_files = sorted((demo / "frames").glob("frame_*.png"))
    mtimes = {p: p.stat().st_mtime_ns for p in frame_files}
    bench_onnx = bench / "checkpoint" / "model_best.onnx"
    bench_mtime = bench_onnx.stat().st_mtime_ns
    demo_onnx = demo / "checkpoint" / "model_best.onnx"
    demo_bytes = demo_onnx.read_bytes()

    demo_onnx.unlink()
    frame_files[3].unlink()
    ma.ensure_avatars(tmp_path, frames=50)  # existing avatars keep their frame count

    assert demo_onnx.read_bytes() == demo_bytes
    assert frame_files[3].is_file()
    for p, t in mtimes.items():
        if p != frame_files[3]:
            assert p.stat().st_mtime_ns == t, p
    assert len(list((demo / "frames").glob("frame_*.png"))) == FRAMES
    assert bench_onnx.stat().st_mtime_ns == bench_mtime
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left behind


def test_cli_demo_only(tmp_path: Path, capsys) -> None:
    assert ma.main(["--root", str(tmp_path), "--only", "demo", "--frames", "3"]) == 0
    out = capsys.readouterr().out
    assert "demo: 3 frames" in out and "model_best.onnx" in out
    assert len(list((tmp_path / "demo" / "frames").iterdir())) == 3
    assert not (tmp_path / "bench").exists()


def test_make_demo_with_another_frame_count(tmp_path: Path) -> None:
    ma.make_demo(tmp_path, frames=6)
    kept = tmp_path / "demo" / "frames" / "frame_0002.png"
    mtime = kept.stat().st_mtime_ns
    ma.make_demo(tmp_path, frames=3)
    frames = sorted(p.name for p in (tmp_path / "demo" / "frames").iterdir())
    assert frames == ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
    assert len(json.loads((tmp_path / "demo" / "crop_rects.json").read_text())) == 3
    assert kept.stat().st_mtime_ns == mtime
    assert (tmp_path / "demo" / "checkpoint" / "model_best.onnx").is_file()


def test_missing_rects_alone_are_rewritten(tmp_path: Path) -> None:
    ma.make_demo(tmp_path, frames=3)
    rects = tmp_path / "demo" / "crop_rects.json"
    onnx_file = tmp_path / "demo" / "checkpoint" / "model_best.onnx"
    before, onnx_mtime = rects.read_bytes(), onnx_file.stat().st_mtime_ns
    rects.unlink()
    ma.ensure_avatars(tmp_path, names=("demo",), frames=3)
    assert rects.read_bytes() == before
    assert onnx_file.stat().st_mtime_ns == onnx_mtime


# ---------------------------------------------------------------------------------- audio encoder


def test_demo_audio_encoder_contract_and_levels(tmp_path: Path) -> None:
    from engine.audio.mel import frame_count, mel_windows, melspectrogram
    from engine.audio.speech import speech_pcm

    path = ma.make_audio_encoder(tmp_path)
    assert path == tmp_path / "audio_encoder.onnx"
    model = onnx.load(str(path))
    assert model.ir_version == 8
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    inits = {t.name for t in model.graph.initializer}
    assert [(vi.name, dims(vi)) for vi in model.graph.input if vi.name not in inits] == [
        ("mel_spectrogram", ["batch", 1, 80, 16])]
    assert [(vi.name, dims(vi)) for vi in model.graph.output] == [("audio_features", ["batch", 512])]
    mtime = path.stat().st_mtime_ns
    assert ma.make_audio_encoder(tmp_path) == path and path.stat().st_mtime_ns == mtime  # kept
    assert path.read_bytes() == nets.build_demo_audio_encoder().SerializeToString()  # deterministic

    sess = _session(model)
    (silent,) = sess.run(None, {"mel_spectrogram": np.full((3, 1, 80, 16), -4.0, np.float32)})
    assert silent.shape == (3, 512) and silent.dtype == np.float32
    assert np.all(silent == 0)

    pcm = speech_pcm(6.0, 3)
    mel = melspectrogram(pcm)
    windows = mel_windows(mel, 0, frame_count(pcm.size))
    (feats,) = sess.run(None, {"mel_spectrogram": windows})
    level = np.abs(feats).mean(axis=1)
    pattern = nets.audio_encoder_pattern()
    np.testing.assert_allclose(feats, level[:, None] * pattern[None], rtol=1e-6, atol=1e-7)  # s * P
    loudness = windows.mean(axis=(1, 2, 3))
    assert np.all(level[loudness < -3.9] == 0)  # pauses (-80 dBFS noise floor): closed mouth
    speaking = level[level > 0]
    assert speaking.size > 0.5 * level.size
    assert 0.3 <= np.median(speaking) <= 1.0 and level.max() <= 1.2
    # Louder windows give larger features (a monotone map of the window mean), and the level moves
    # syllable by syllable rather than sitting at one value.
    order = np.argsort(loudness)
    assert np.all(np.diff(level[order]) >= 0)
    assert np.percentile(speaking, 90) - np.percentile(speaking, 10) > 0.3
    assert np.abs(np.diff(level)).max() > 0.1


def test_ensure_avatars_writes_the_audio_encoder(tmp_path: Path) -> None:
    ma.ensure_avatars(tmp_path, names=("demo",), frames=2)
    enc = tmp_path / "audio_encoder.onnx"
    assert enc.is_file()
    mtime = enc.stat().st_mtime_ns
    ma.ensure_avatars(tmp_path, names=("demo",), frames=2)
    assert enc.stat().st_mtime_ns == mtime
    enc.unlink()
    ma.ensure_avatars(tmp_path, names=("demo",), frames=2)
    assert enc.read_bytes() == nets.build_demo_audio_encoder().SerializeToString()
