"""Restart-interval splicing (engine/kernels/splice.py): byte equality with a full-frame encode of the same
composited frame, decoders, edges, subsamplings, qualities, pastes."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from engine.kernels.image import FrameCompositor, crop_border, cut_crop
from engine.kernels.splice import FrameCodec, FrameParts, JpegError, Settings, SpliceCompositor, restart_interval

FACE = 64


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A frame with smooth gradients, texture, hard edges and saturated blocks (large DC jumps,
    0xFF bytes to stuff, long AC runs): harder on the entropy coder than a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 0.31) % 256, (yy * 0.57) % 256, ((xx + 2 * yy) * 0.13) % 256], -1)
    img = img + cv2.GaussianBlur(rng.normal(0, 40, (h, w, 3)), (0, 0), 1.2)
    img[(xx // 37 + yy // 29) % 7 == 0] = 255
    img[(xx // 53 + yy // 41) % 11 == 0] = 0
    return np.clip(img, 0, 255).astype(np.uint8)


def pillow_jpeg(bgr: np.ndarray, subsampling: str, quality: int = 75, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).save(buf, "JPEG", quality=quality,
                                                               subsampling=subsampling, **kw)
    return buf.getvalue()


def face_output(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:FACE, 0:FACE] / FACE
    base = np.stack([0.5 + 0.4 * np.sin(9 * xx), 0.5 + 0.4 * np.cos(7 * yy), 0.2 + 0.6 * xx * yy])
    return (base + rng.normal(0, 0.05, base.shape)).astype(np.float32)


def prepared(codec: FrameCodec, frame: np.ndarray, rect) -> FrameParts:
    """A background frame's spliced form, as engine/avatars/spliced.py stores it."""
    jpeg = codec.encode_full(frame)
    x0, y0, x1, y1 = codec.box(rect)
    return FrameParts(np.frombuffer(jpeg, np.uint8)[len(codec.header):-2].copy(), codec.plan(jpeg, rect),
                      frame[y0:y1, x0:x1].copy(), tuple(rect), crop_border(cut_crop(frame, rect, FACE)))


def full_path(frame: np.ndarray, rect, face: np.ndarray, mode: str) -> np.ndarray:
    """Today's full path: the whole frame composited (FrameCompositor, output.encoder = "full")."""
    return FrameCompositor().composite(frame, face, rect, cut_crop(frame, rect, FACE), mode).copy()


def test_restart_interval_divides_the_mcu_row():
    assert restart_interval(80, 16) == 16 and restart_interval(63, 16) == 9 and restart_interval(45, 16) == 15
    assert restart_interval(120, 16) == 15 and restart_interval(7, 16) == 7 and restart_interval(13, 4) == 1
    # the default: half a row, or the largest divisor below it (1280, 1000 and 720 pixels wide at 4:2:0)
    assert [FrameCodec(64, w, Settings()).interval for w in (1280, 1000, 720)] == [40, 21, 15]


# -- the splice: byte for byte the full-frame encode -----------------------------------------------------
def rects_for(h: int, w: int) -> list[tuple[int, int, int, int]]:
    s = 183 if min(h, w) >= 400 else min(h, w) // 2
    return [(w // 2 - 91, h // 3, w // 2 - 91 + s, h // 3 + s),          # inside, off the MCU grid
            (0, 0, s, s),                                              # top-left corner
            (w - s, h - s, w, h),                                      # bottom-right corner
            (w - s - 3, 5, w - 3, 5 + s),                              # 3 px short of the right edge
            (7, h - s - 1, 7 + s, h - 1),                              # 1 px short of the bottom
            (32, 48, 32 + 2 * 16, 48 + 16),                            # exactly on the MCU grid
            (17, 33, 19, 35)]                                          # 2 px, inside one MCU


@pytest.mark.parametrize("shape", [(720, 1280), (562, 1000), (1080, 1920), (1280, 720)])
@pytest.mark.parametrize("subsampling", ["444", "422", "420", "411"])
def test_splice_is_the_full_frame_encode_byte_for_byte(shape, subsampling):
    h, w = shape
    frame = textured(h, w, seed=w)
    codec = FrameCodec(h, w, Settings(75, subsampling))
    sc = SpliceCompositor(codec)
    for n, rect in enumerate(rects_for(h, w)):
        parts = prepared(codec, frame, rect)
        for mode in ("synctalk", "stretch"):
            face = face_output(n)
            got = sc(parts, face, mode)
            composited = full_path(frame, rect, face, mode)
            assert got == codec.encode_full(composited), (rect, mode)


@pytest.mark.parametrize("quality", [5, 50, 90, 100])
@pytest.mark.parametrize("interval_px", [8, 64, 0, 100_000])
def test_splice_at_any_quality_and_interval(quality, interval_px):
    frame = textured(240, 416, seed=quality)
    codec = FrameCodec(240, 416, Settings(quality, "420", interval_px=interval_px))
    assert codec.interval == {8: 1, 64: 2, 0: 13, 100_000: 26}[interval_px]
    sc = SpliceCompositor(codec)
    for n, rect in enumerate([(100, 50, 200, 150), (316, 140, 416, 240), (0, 0, 64, 64)]):
        parts = prepared(codec, frame, rect)
        face = face_output(n)
        assert sc(parts, face) == codec.encode_full(full_path(frame, rect, face, "synctalk"))


def test_region_covers_whole_mcus_and_stops_at_the_frame_edge():
    codec = FrameCodec(562, 1000, Settings(75, "420"))
    assert codec.box((549, 300, 732, 483)) == (544, 288, 736, 496)
    assert codec.box((817, 379, 1000, 562)) == (816, 368, 1000, 562)     # the frame's own edge, not 1008 x 576
    assert FrameCodec(64, 64, Settings(75, "411")).box((5, 5, 40, 9)) == (0, 0, 64, 16)


# -- decoders, the full path, idle frames -----------------------------------------------------------------
@pytest.mark.parametrize("subsampling", ["444", "420"])
def test_spliced_frames_decode_the_same_everywhere_and_as_the_full_path(subsampling):
    """Restart markers are lossless: a spliced frame decodes to the pixels of today's full-frame
    JPEG of the same composited frame, in libjpeg-turbo (simplejpeg), Pillow and OpenCV alike."""
    h, w = 562, 1000
    frame = textured(h, w, seed=3)
    rect = (400, 200, 583, 383)
    codec = FrameCodec(h, w, Settings(75, subsampling))
    face = face_output(1)
    spliced = SpliceCompositor(codec)(prepared(codec, frame, rect), face)
    composited = full_path(frame, rect, face, "synctalk")
    today = FrameCompositor(75, subsampling).encode(composited)          # output.encoder = "full"
    a = simplejpeg.decode_jpeg(spliced, colorspace="BGR")
    b = cv2.cvtColor(np.asarray(Image.open(io.BytesIO(spliced)).convert("RGB")), cv2.COLOR_RGB2BGR)
    c = cv2.imdecode(np.frombuffer(spliced, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert np.array_equal(a, simplejpeg.decode_jpeg(today, colorspace="BGR"))
    # and within the JPEG's own error of the composited pixels
    err = np.abs(a.astype(int) - composited).mean()
    assert err < 6
    assert len(spliced) <= 1.03 * len(today)


def test_idle_frame_is_the_background_jpeg():
    frame = textured(720, 1280)
    codec = FrameCodec(720, 1280, Settings())
    parts = prepared(codec, frame, (549, 300, 732, 483))
    out = np.zeros(200_000, np.uint8)
    n = codec.idle(parts.scan, out)
    assert out[:n].tobytes() == codec.encode_full(frame)
    assert codec.idle(parts.scan, out[:1000]) == -1


def test_splice_into_a_small_buffer_says_how_much_it_needs():
    frame = textured(128, 128)
    codec = FrameCodec(128, 128, Settings())
    sc = SpliceCompositor(codec)
    parts = prepared(codec, frame, (30, 30, 90, 90))
    region = sc.region_jpeg(parts, face_output(0))
    need = sc.splice_into(parts, region, np.zeros(100, np.uint8))
    assert need < -100
    out = np.zeros(-need, np.uint8)
    n = sc.splice_into(parts, region, out)
    assert out[:n].tobytes() == sc.splice_bytes(parts, region)


def test_what_cannot_be_spliced_is_named():
    frame = textured(64, 64)
    codec = FrameCodec(64, 64, Settings())
    parts = prepared(codec, frame, (8, 8, 40, 40))
    other = Settings(90).encode(frame[:32, :32].copy())       # other tables
    with pytest.raises(JpegError):
        codec.splice(parts.scan, parts.recs, other, (8, 8, 40, 40), np.zeros(100_000, np.uint8))
    with pytest.raises(ValueError, match="subsampling"):
        FrameCodec(64, 64, Settings(75, "440"))
    # a damaged region (its scan cut short): an error, never a read past the buffers
    big = textured(256, 256)
    codec = FrameCodec(256, 256, Settings())
    parts = prepared(codec, big, (40, 40, 220, 220))
    region = SpliceCompositor(codec).region_jpeg(parts, face_output(0))
    a = codec.layout.scan
    short = region[:a + (len(region) - a) // 3] + b"\xff\xd9"
    with pytest.raises(JpegError, match="decode"):
        codec.splice(parts.scan, parts.recs, short, (40, 40, 220, 220), np.zeros(1 << 20, np.uint8))
