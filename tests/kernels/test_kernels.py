"""Preprocessing and paste-back against a plain numpy reference (REFERENCE.md sections 2 and 3)."""
from __future__ import annotations

import numpy as np
import pytest
import simplejpeg

from engine.kernels.image import FrameCompositor, cut_crop, face_to_u8, fill_visual, frame_index, mask_box, paste_face


# -- plain numpy reference: OpenCV's resize conventions (half-pixel centres, replicated border) -----
def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _resize_axis(img: np.ndarray, n_out: int, axis: int, kind: str) -> np.ndarray:
    n_in = img.shape[axis]
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    if kind == "linear":
        src = np.maximum(src, 0)
    i0 = np.floor(src).astype(int)
    t = src - i0
    taps = range(-1, 3) if kind == "cubic" else range(0, 2)
    acc = np.zeros(img.shape[:axis] + (n_out,) + img.shape[axis + 1:], np.float64)
    for k in taps:
        w = _cubic(t - k) if kind == "cubic" else np.where(k == 0, 1 - t, t)
        idx = np.clip(i0 + k, 0, n_in - 1)
        shape = [1] * img.ndim
        shape[axis] = n_out
        acc += np.take(img.astype(np.float64), idx, axis=axis) * w.reshape(shape)
    return acc


def ref_resize(img: np.ndarray, w: int, h: int, kind: str = "cubic") -> np.ndarray:
    out = _resize_axis(_resize_axis(img, h, 0, kind), w, 1, kind)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def ref_face_u8(face: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(face.transpose(1, 2, 0).astype(np.float64) * 255 + 0.5), 0, 255).astype(np.uint8)


@pytest.fixture
def scene():
    rng = np.random.default_rng(1)
    # smooth content (as in a real frame) so resampling differences stay at rounding level
    yy, xx = np.mgrid[0:360, 0:480]
    bg = np.stack([(xx * 0.5) % 256, (yy * 0.7) % 256, ((xx + yy) * 0.3) % 256], -1)
    bg = (bg + rng.normal(0, 2, bg.shape)).clip(0, 255).astype(np.uint8)
    rect = (130, 90, 130 + 183, 90 + 183)
    yy, xx = np.mgrid[0:320, 0:320] / 320.0
    face = np.stack([0.5 + 0.4 * np.sin(6 * xx), 0.5 + 0.4 * np.cos(5 * yy), 0.3 + 0.5 * xx * yy]).astype(np.float32)
    return bg, rect, face


def test_frame_index_pingpong_and_modulo():
    assert [frame_index(k, 4) for k in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert [frame_index(k, 4, "modulo") for k in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [frame_index(k, 1) for k in range(3)] == [0, 0, 0]
    ks = np.arange(523 * 3)
    assert np.array_equal(frame_index(ks, 523), [frame_index(int(k), 523) for k in ks])
    # ping-pong never jumps by more than one frame
    assert np.abs(np.diff(frame_index(ks, 523))).max() == 1


def test_cut_crop_is_bicubic_328(scene):
    bg, rect, _ = scene
    crop = cut_crop(bg, rect, 320)
    assert crop.shape == (328, 328, 3) and crop.dtype == np.uint8
    x1, y1, x2, y2 = rect
    ref = ref_resize(bg[y1:y2, x1:x2], 328, 328)
    diff = np.abs(crop.astype(int) - ref)
    assert diff.max() <= 2 and diff.mean() < 0.3


def test_fill_visual_reference_and_mask(scene):
    bg, rect, _ = scene
    crops = np.stack([cut_crop(bg, rect, 320), cut_crop(bg[::-1].copy(), rect, 320)])
    out = np.full((2, 6, 320, 320), -1, np.float32)
    fill_visual(crops, out)
    face = crops[:, 4:324, 4:324].transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.testing.assert_allclose(out[:, :3], face, atol=1e-6)
    y0, y1, x0, x1 = mask_box(320)
    assert (y0, y1, x0, x1) == (5, 310, 5, 315)
    masked = face.copy()
    masked[:, :, y0:y1, x0:x1] = 0
    np.testing.assert_allclose(out[:, 3:], masked, atol=1e-6)


def test_face_to_u8_clamps_and_rounds():
    row = np.array([-0.5, 0.0, 0.5, 1.0, 1.7, 0.999], np.float32)
    face = np.broadcast_to(row, (3, 6, 6)).copy()
    out = face_to_u8(face)
    assert out.shape == (6, 6, 3)
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255, 255]


@pytest.mark.parametrize("mode", ["synctalk", "stretch"])
def test_paste_outside_rect_is_background_inside_is_resized_output(scene, mode):
    bg, rect, face = scene
    x1, y1, x2, y2 = rect
    crop = cut_crop(bg, rect, 320)
    frame = bg.copy()
    paste_face(frame, face, rect, crop, mode)
    outside = np.ones(bg.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(frame[outside], bg[outside])
    if mode == "synctalk":
        work = crop.copy()
        work[4:324, 4:324] = ref_face_u8(face)
        ref = ref_resize(work, x2 - x1, y2 - y1, "cubic")
    else:
        ref = ref_resize(ref_face_u8(face), x2 - x1, y2 - y1, "linear")
    diff = np.abs(frame[y1:y2, x1:x2].astype(int) - ref)
    assert diff.max() <= 2 and diff.mean() < 0.3
    # the output really is in there: far from the background
    assert np.abs(frame[y1:y2, x1:x2].astype(int) - bg[y1:y2, x1:x2]).mean() > 20


def test_synctalk_border_keeps_original_pixels(scene):
    bg, rect, face = scene
    x1, y1, x2, y2 = rect
    crop = cut_crop(bg, rect, 320)
    frame = bg.copy()
    paste_face(frame, np.zeros_like(face), rect, crop, "synctalk")
    # the outermost pixel ring of the rectangle comes mostly from the 4-pixel border of original pixels
    edge = np.abs(frame[y1, x1 + 20:x2 - 20].astype(int) - bg[y1, x1 + 20:x2 - 20]).mean()
    centre = np.abs(frame[(y1 + y2) // 2, x1 + 20:x2 - 20].astype(int) - bg[(y1 + y2) // 2, x1 + 20:x2 - 20]).mean()
    assert edge < 40 < centre


def test_frame_compositor_encodes_the_composite(scene):
    bg, rect, face = scene
    fc = FrameCompositor(quality=90)
    crop = cut_crop(bg, rect, 320)
    jpeg = fc(bg, face, rect, crop)
    assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
    decoded = simplejpeg.decode_jpeg(jpeg, colorspace="BGR")
    expected = bg.copy()
    paste_face(expected, face, rect, crop)
    assert decoded.shape == bg.shape
    mse = np.mean((decoded.astype(float) - expected) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30
    # reused buffers do not leak one frame into the next
    jpeg2 = fc(bg, np.zeros_like(face), rect, crop)
    assert jpeg2 != jpeg


def test_synctalk_paste_needs_the_crop(scene):
    bg, rect, face = scene
    with pytest.raises(ValueError, match="crop"):
        paste_face(bg.copy(), face, rect, None, "synctalk")


def test_fill_visual_reads_the_indexed_crops_in_place(scene):
    bg, rect, _ = scene
    crops = np.stack([cut_crop(np.roll(bg, 7 * k, axis=1), rect, 320) for k in range(4)])
    out = np.empty((3, 6, 320, 320), np.float32)
    fill_visual(crops, out, np.array([3, 0, 3]))
    ref = np.empty_like(out)
    fill_visual(crops[[3, 0, 3]], ref)
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match="indices"):
        fill_visual(crops, out, np.array([1, 2]))


def test_fastdct_changes_nothing_with_this_simplejpeg():
    """Why output.fastdct was removed (README, configuration): simplejpeg's encoder writes the same
    bytes either way. If a simplejpeg release changes that, this fails: a setting may matter again."""
    img = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    for sub in ("444", "420"):
        assert simplejpeg.encode_jpeg(img, 75, "RGB", sub, fastdct=True) == \
            simplejpeg.encode_jpeg(img, 75, "RGB", sub, fastdct=False)
