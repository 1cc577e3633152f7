"""Baseline JPEG at the bit level (engine/kernels/jpeg_bits.py): restart coding byte-identical to libjpeg's
own (Pillow encodes with and without restart markers), and JPEGs that cannot be spliced, named."""
from __future__ import annotations

import pytest

from engine.kernels.jpeg_bits import add_restarts
from engine.kernels.jpeg_layout import JpegError, parse_jpeg, restart_interval

from .test_splice import pillow_jpeg, textured


# -- restart coding: the same bytes as libjpeg's own -------------------------------------------------
@pytest.mark.parametrize("shape", [(720, 1280), (562, 1000), (37, 53)])
@pytest.mark.parametrize("subsampling", ["4:4:4", "4:2:2", "4:2:0"])
def test_add_restarts_writes_what_libjpeg_writes(shape, subsampling):
    img = textured(*shape, seed=shape[0])
    plain = pillow_jpeg(img, subsampling)
    mcux = parse_jpeg(plain).mcux
    for k in sorted({1, 3, 7, restart_interval(mcux, 16), mcux, 1000}):
        assert add_restarts(plain, k) == pillow_jpeg(img, subsampling, restart_marker_blocks=k), k


def test_what_is_not_a_spliceable_jpeg_is_named():
    frame = textured(64, 64)
    with pytest.raises(JpegError, match="progressive"):
        parse_jpeg(pillow_jpeg(frame, "4:2:0", progressive=True))
    with pytest.raises(JpegError, match="SOI"):
        parse_jpeg(b"not a jpeg")
    plain = pillow_jpeg(frame, "4:2:0")
    with pytest.raises(JpegError, match="already"):
        add_restarts(add_restarts(plain, 2), 2)
    with pytest.raises(JpegError, match="EOI"):
        add_restarts(plain[:-2], 2)
    lay = parse_jpeg(plain)
    assert (lay.width, lay.height, lay.mcu_w, lay.mcu_h, lay.mcux, lay.mcuy) == (64, 64, 16, 16, 4, 4)
