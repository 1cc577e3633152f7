"""Compositor per frame, one core: a plain full-frame simplejpeg encode (the yardstick), today's
full path (paste + whole-frame JPEG, ``output.encoder = "full"``), the splice path (paste into the
face region, encode it, splice it into the background's JPEG) and an idle frame, at 1280x720 and
1920x1080 with the demo avatar's frame and face rectangle, side by side in one run. Then the
restart interval, output sizes, memory per frame and avatar loading.

    tools/dev test tests/bench --benchmark-enable --benchmark-columns=min,median,max,ops -s

Figures and their ratios: docs/performance.md. Nothing here asserts a time.
"""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import simplejpeg

from engine.avatars.disk import avatar_files, read_graph
from engine.avatars.frames import AvatarView
from engine.avatars.spliced import SplicedAvatarView, prepared_path
from engine.kernels.image import FrameCompositor, crop_border, cut_crop
from engine.kernels.splice import FrameCodec, FrameParts, Settings, SpliceCompositor

SHM = f"lsebench{os.getpid()}"          # per process: xdist workers may run this module side by side
SIZES = {"1280x720": (720, 1280, 1.0), "1920x1080": (1080, 1920, 1.5)}


def demo_face(models_root, bg: np.ndarray, rect) -> np.ndarray:
    """What the demo network returns for this frame with speech-like audio (a face, mouth open):
    a real output, so the region JPEG has a face's content, not noise."""
    import onnxruntime as ort

    from engine.audio.speech import speech_like_features
    from engine.kernels.image import fill_visual
    image = np.empty((1, 6, 320, 320), np.float32)
    fill_visual(cut_crop(bg, rect, 320)[None], image)
    sess = ort.InferenceSession(str(models_root / "demo" / "checkpoint" / "model_best.onnx"),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": image, "audio": speech_like_features(1, 3)})[0][0]


def say(capsys, text: str) -> None:
    with capsys.disabled():
        print("\n" + text)


@pytest.fixture(scope="module", params=list(SIZES))
def scene(request, models_root):
    """(name, frame, rect, crop, face, codec, parts): the demo avatar's frame 0 and its rectangle,
    scaled to the size; the frame's spliced form as the avatar segment holds it."""
    cv2.setNumThreads(1)
    h, w, scale = SIZES[request.param]
    bg = cv2.imread(str(models_root / "demo" / "frames" / "frame_0000.png"))
    bg = cv2.resize(bg, (w, h), interpolation=cv2.INTER_CUBIC) if scale != 1 else bg
    r = json.loads((models_root / "demo" / "crop_rects.json").read_text())[0]
    rect = tuple(int(round(v * scale)) for v in r)
    crop = cut_crop(bg, rect, 320)
    face = demo_face(models_root, bg, rect)
    codec = FrameCodec(h, w, Settings())
    jpeg = codec.encode_full(bg)
    x0, y0, x1, y1 = codec.box(rect)
    parts = FrameParts(np.frombuffer(jpeg, np.uint8)[len(codec.header):-2].copy(), codec.plan(jpeg, rect),
                       bg[y0:y1, x0:x1].copy(), rect, crop_border(crop))
    return request.param, bg, rect, crop, face, codec, parts


def test_plain_simplejpeg_encode(benchmark, scene):
    name, bg = scene[:2]
    benchmark.group = f"compositor-{name}"
    jpeg = benchmark(simplejpeg.encode_jpeg, bg, quality=75, colorspace="BGR", colorsubsampling="420", fastdct=True)
    assert jpeg[:2] == b"\xff\xd8"


@pytest.mark.parametrize("mode", ["synctalk", "stretch"])
def test_full_composite_and_encode(benchmark, scene, mode):
    name, bg, rect, crop, face = scene[:5]
    benchmark.group = f"compositor-{name}"
    fc = FrameCompositor(75, "420")
    jpeg = benchmark(fc, bg, face, rect, crop if mode == "synctalk" else None, mode)
    assert simplejpeg.decode_jpeg(jpeg).shape == bg.shape


@pytest.mark.parametrize("mode", ["synctalk", "stretch"])
def test_splice_composite_and_encode(benchmark, scene, mode):
    """What the compositor does per frame: paste into the region, encode it, splice into the ring."""
    name, bg, rect, crop, face, codec, parts = scene
    benchmark.group = f"compositor-{name}"
    sc = SpliceCompositor(codec)
    out = np.empty(4 << 20, np.uint8)

    def frame() -> int:
        return sc.splice_into(parts, sc.region_jpeg(parts, face, mode), out)
    n = benchmark(frame)
    composited = FrameCompositor().composite(bg, face, rect, crop, mode)
    assert out[:n].tobytes() == codec.encode_full(composited)


def test_splice_noise_face_worst_case(benchmark, scene):
    """A face of uniform noise: the region JPEG is ~8 x larger than a face's, so encoding and
    splicing it cost the most (an upper bound, not what a network returns)."""
    name, bg, rect, crop, face, codec, parts = scene
    benchmark.group = f"compositor-{name}"
    noise = np.random.default_rng(0).random(face.shape, np.float32)
    sc = SpliceCompositor(codec)
    out = np.empty(4 << 20, np.uint8)
    n = benchmark(lambda: sc.splice_into(parts, sc.region_jpeg(parts, noise), out))
    assert out[:n].tobytes() == codec.encode_full(FrameCompositor().composite(bg, noise, rect, crop))


def test_idle_frame(benchmark, scene):
    name, bg, codec, parts = scene[0], scene[1], scene[5], scene[6]
    benchmark.group = f"compositor-{name}"
    out = np.empty(4 << 20, np.uint8)
    n = benchmark(codec.idle, parts.scan, out)
    assert out[:n].tobytes() == codec.encode_full(bg)


def test_full_paste_only(benchmark, scene):
    name, bg, rect, crop, face = scene[:5]
    benchmark.group = f"compositor-{name}"
    fc = FrameCompositor(75, "420")
    assert benchmark(fc.composite, bg, face, rect, crop).shape == bg.shape


def test_output_size_and_memory(scene, capsys):
    """Printed, not timed: output size against the plain encode, and the frame's memory."""
    name, bg, rect, crop, face, codec, parts = scene
    plain = len(simplejpeg.encode_jpeg(bg, 75, "BGR", "420", True))
    composited = FrameCompositor().composite(bg, face, rect, crop, "synctalk")
    spliced = len(SpliceCompositor(codec)(parts, face))
    memory = len(parts.scan) + parts.region.nbytes + parts.border.nbytes + parts.recs.nbytes
    say(capsys, f"{name}: interval {codec.interval} MCUs; background {plain} B plain, "
                f"{len(parts.scan) + len(codec.header) + 2} B with restarts "
                f"({100 * ((len(parts.scan) + len(codec.header) + 2) / plain - 1):+.2f}%); output frame "
                f"{spliced} B vs {len(simplejpeg.encode_jpeg(composited, 75, 'BGR', '420', True))} B plain "
                f"; memory per frame {memory} B spliced vs {bg.nbytes + crop.nbytes} B decoded "
                f"({(bg.nbytes + crop.nbytes) / memory:.1f} x less)")


# -- the restart interval: splice work against marker overhead -------------------------------------------
@pytest.fixture(scope="module")
def demo720(models_root):
    cv2.setNumThreads(1)
    bg = cv2.imread(str(models_root / "demo" / "frames" / "frame_0000.png"))
    rect = tuple(json.loads((models_root / "demo" / "crop_rects.json").read_text())[0])
    return bg, rect, cut_crop(bg, rect, 320), demo_face(models_root, bg, rect)


@pytest.mark.parametrize("interval_px", [16, 64, 128, 256, 0, 1280])       # 0: half a row, the default
def test_restart_interval(benchmark, demo720, interval_px, capsys):
    bg, rect, crop, face = demo720
    benchmark.group = "splice-interval-1280x720"
    codec = FrameCodec(720, 1280, Settings(interval_px=interval_px))
    jpeg = codec.encode_full(bg)
    x0, y0, x1, y1 = codec.box(rect)
    parts = FrameParts(np.frombuffer(jpeg, np.uint8)[len(codec.header):-2].copy(), codec.plan(jpeg, rect),
                       bg[y0:y1, x0:x1].copy(), rect, crop_border(crop))
    sc = SpliceCompositor(codec)
    region = sc.region_jpeg(parts, face)
    out = np.empty(4 << 20, np.uint8)
    benchmark(sc.splice_into, parts, region, out)            # the splice alone (the region is encoded once)
    plain = len(simplejpeg.encode_jpeg(bg, 75, "BGR", "420", True))
    benchmark.extra_info["size_overhead"] = len(jpeg) / plain - 1
    say(capsys, f"interval {interval_px or 'half row'} px = {codec.interval} MCUs: background +{100 * (len(jpeg) / plain - 1):.2f}% "
                f"over the plain encode, {len(parts.recs)} intervals re-built per frame")


@pytest.mark.parametrize("interval_px", [256, 0, 100_000], ids=["256px", "half-row", "row"])
@pytest.mark.parametrize("subsampling", ["420", "444"])
@pytest.mark.parametrize("size", list(SIZES))
def test_restart_interval_nine_positions(benchmark, models_root, demo720, size, subsampling, interval_px, capsys):
    """The splice alone for the face rectangle at nine positions across the frame (one call splices
    all nine): where the interval boundaries fall against the face decides the work."""
    _, _, crop720, face = demo720
    h, w, scale = SIZES[size]
    bg = cv2.imread(str(models_root / "demo" / "frames" / "frame_0000.png"))
    bg = cv2.resize(bg, (w, h), interpolation=cv2.INTER_CUBIC) if scale != 1 else bg
    benchmark.group = f"splice-interval-9-positions-{size}-{subsampling}"
    codec = FrameCodec(h, w, Settings(75, subsampling, interval_px=interval_px))
    jpeg = codec.encode_full(bg)
    side = int(183 * scale)
    jobs = []
    for x in np.linspace(0, w - side, 9).astype(int):
        rect = (int(x), int(0.4 * h), int(x) + side, int(0.4 * h) + side)
        x0, y0, x1, y1 = codec.box(rect)
        parts = FrameParts(np.frombuffer(jpeg, np.uint8)[len(codec.header):-2].copy(), codec.plan(jpeg, rect),
                           bg[y0:y1, x0:x1].copy(), rect, crop_border(cut_crop(bg, rect, 320)))
        sc = SpliceCompositor(codec)
        jobs.append((sc, parts, sc.region_jpeg(parts, face)))
    out = np.empty(4 << 20, np.uint8)

    def nine() -> None:
        for sc, parts, region in jobs:
            sc.splice_into(parts, region, out)
    benchmark(nine)
    plain = len(simplejpeg.encode_jpeg(bg, 75, "BGR", subsampling, True))
    say(capsys, f"{size} {subsampling} interval {codec.interval} MCUs: background +{100 * (len(jpeg) / plain - 1):.2f}%")


def test_restart_marker_overhead(models_root, capsys):
    """Printed: the background's size with restart markers against the plain encode, every
    subsampling, 256-px / half-row / whole-row intervals, both sizes."""
    bg0 = cv2.imread(str(models_root / "demo" / "frames" / "frame_0000.png"))
    lines = []
    for size, (h, w, scale) in SIZES.items():
        bg = cv2.resize(bg0, (w, h), interpolation=cv2.INTER_CUBIC) if scale != 1 else bg0
        for sub in ("444", "422", "420", "411"):
            plain = len(simplejpeg.encode_jpeg(bg, 75, "BGR", sub, True))
            cells = []
            for px, name in ((256, "256px"), (0, "half-row"), (100_000, "row")):
                codec = FrameCodec(h, w, Settings(75, sub, interval_px=px))
                cells.append(f"{name} +{100 * (len(codec.encode_full(bg)) / plain - 1):.2f}%")
            lines.append(f"{size} {sub}: " + ", ".join(cells))
    say(capsys, "\n".join(lines))


# -- avatar loading: decoding the frames, building the spliced form, reading it back -------------------
def test_load_decoded(benchmark, models_root):
    benchmark.group = "avatar-load"
    files = avatar_files(models_root, "demo")

    def load() -> None:
        AvatarView.create(f"{SHM}_dec", files, 320).close()
    benchmark.pedantic(load, rounds=3, warmup_rounds=1)


def test_load_build_spliced(benchmark, models_root):
    benchmark.group = "avatar-load"
    files = avatar_files(models_root, "demo")

    def build() -> None:
        SplicedAvatarView.create(f"{SHM}_bld", files, 320, Settings(), save=False).close()
    benchmark.pedantic(build, rounds=3, warmup_rounds=1)


def test_load_prepared(benchmark, models_root, capsys):
    benchmark.group = "avatar-load"
    files = avatar_files(models_root, "demo")
    face = read_graph(files.onnx).face
    SplicedAvatarView.create(f"{SHM}_pre", files, face, Settings()).close()     # make sure the file exists
    assert prepared_path(files, Settings(), face).is_file()

    def reload() -> None:
        SplicedAvatarView.create(f"{SHM}_pre", files, face, Settings()).close()
    benchmark.pedantic(reload, rounds=10, warmup_rounds=1)
    v = SplicedAvatarView.create(f"{SHM}_pre", files, face, Settings())
    say(capsys, f"spliced demo avatar: {v.n} frames, {v.nbytes} B in shared memory, {v.nbytes / v.n:.0f} B per frame "
                f"({json.dumps(v.memory())})")
    v.close()


# -- the GPU worker's input: stored crops (decoded layout) or cut from the face regions (spliced) ---------
@pytest.fixture(scope="module")
def both_layouts(models_root):
    cv2.setNumThreads(1)
    files = avatar_files(models_root, "demo")
    spliced = SplicedAvatarView.create(f"{SHM}_gs", files, 320, Settings())
    decoded = AvatarView.create(f"{SHM}_gd", files, 320)
    yield spliced, decoded
    spliced.close()
    decoded.close()


@pytest.mark.parametrize("layout", ["decoded", "spliced"])
def test_gpu_worker_fill_visual_batch_12(benchmark, both_layouts, layout):
    from engine.kernels.image import fill_visual
    benchmark.group = "gpu-worker-image-input-batch-12"
    view = both_layouts[0] if layout == "spliced" else both_layouts[1]
    idx = np.arange(12) % view.n
    image = np.empty((12, 6, 320, 320), np.float32)

    def prep() -> None:
        crops, local = view.crops_for(idx)
        fill_visual(crops, image, local)
    benchmark(prep)
    ref = np.empty_like(image)
    fill_visual(both_layouts[1].crops, ref, idx)
    assert np.array_equal(image, ref)
