"""Compositor per frame (paste-back + JPEG of a 1280x720 frame, one core) beside a plain
full-frame simplejpeg encode measured in the same run.

    tools/dev test tests/bench --benchmark-enable --benchmark-columns=min,median,max,ops
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import simplejpeg

from engine.kernels import FrameCompositor, cut_crop

pytestmark = pytest.mark.benchmark(group="compositor-1280x720")


@pytest.fixture(scope="module")
def frame(models_root):
    cv2.setNumThreads(1)
    bg = cv2.imread(str(models_root / "demo" / "frames" / "frame_0000.png"))
    rect = (549, 300, 732, 483)
    face = np.random.default_rng(0).random((3, 320, 320), np.float32)
    return bg, rect, cut_crop(bg, rect, 320), face


def test_plain_simplejpeg_encode(benchmark, frame):
    bg = frame[0]
    jpeg = benchmark(simplejpeg.encode_jpeg, bg, quality=75, colorspace="BGR", colorsubsampling="420",
                     fastdct=True)
    assert jpeg[:2] == b"\xff\xd8"


@pytest.mark.parametrize("mode", ["synctalk", "stretch"])
def test_composite_and_encode(benchmark, frame, mode):
    bg, rect, crop, face = frame
    fc = FrameCompositor(75, "420")
    jpeg = benchmark(fc, bg, face, rect, crop if mode == "synctalk" else None, mode)
    assert simplejpeg.decode_jpeg(jpeg).shape == (720, 1280, 3)


def test_paste_only(benchmark, frame):
    bg, rect, crop, face = frame
    fc = FrameCompositor(75, "420")
    out = benchmark(fc.composite, bg, face, rect, crop)
    assert out.shape == bg.shape
