"""Restart-interval JPEG splicing: encode only the part of a frame the paste changed.

A baseline JPEG with a restart interval of ``k`` MCUs (DRI marker) codes each interval on its
own: DC prediction restarts and the entropy coder is byte-aligned before every RSTn marker. Each
background frame of an avatar is encoded once, with restart markers (:func:`add_restarts`); an
output frame then re-encodes only the MCUs the paste can change (the crop rectangle widened to
whole MCUs, "the region") and splices them into the background's intervals. The result is, byte
for byte, the JPEG that encoding the whole composited frame with the same settings and interval
gives (``tests/kernels/test_splice.py``); a silent frame is the background's own JPEG.

The region is encoded by the same encoder as today's full-frame path (simplejpeg, libjpeg-turbo,
standard Huffman tables), so quality and every chroma subsampling behave the same.
An interval holds MCUs on both sides of the region (A | region | C): the region's MCUs are
written in at bit level, with the first DC of each component re-coded against its new
predecessor (the region's own JPEG predicted it from 0 or from the row above), and the
background's MCUs after the region (C) are shifted to their new bit position, their first DCs
re-coded too. So the interval ``k`` can be long (fewer markers, smaller files) while the stored
region stays MCU-sized (less memory). Intervals never straddle MCU rows: ``k`` divides the MCUs
per row (:func:`restart_interval`).

The bit-level work (Huffman walk, restart coding, the splice itself) is in :mod:`engine.kernels.jpeg_bits`.
Everything here is a plain function or class on numpy arrays: no sockets, no processes, no shared
memory (the avatar's spliced form lives in :mod:`engine.avatars.spliced`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simplejpeg

from engine.kernels.image import FacePaster
from engine.kernels.jpeg_bits import RECLEN, _plan_frame, _restart, _splice, add_restarts
from engine.kernels.jpeg_layout import (
    EOI,
    SOS,
    JpegError,
    dri_header,
    huffman_arrays,
    parse_jpeg,
    restart_interval,
    scan_end,
)

ENCODER_VERSION = f"simplejpeg-{simplejpeg.__version__}"
SUBSAMPLING_FACTORS = {"444": (1, 1), "422": (2, 1), "420": (2, 2), "411": (4, 1)}
__all__ = ["ENCODER_VERSION", "RECLEN", "FrameCodec", "FrameParts", "JpegError", "Settings", "SpliceCompositor",
           "add_restarts", "parse_jpeg", "restart_interval"]


@dataclass(frozen=True)
class Settings:
    """The JPEG settings of an avatar's prepared form: a region splices only into backgrounds
    encoded with the same ones. ``interval_px``: the restart interval's target width in pixels
    (the largest whole number of MCUs not wider that divides the MCU row); 0, the default: half an
    MCU row (measured in docs/performance.md: the markers cost 0.6-1.5% of the file while the
    splice costs within 5% of the fastest interval)."""
    quality: int = 75
    subsampling: str = "420"
    interval_px: int = 0

    def encode(self, pixels: np.ndarray) -> bytes:
        return simplejpeg.encode_jpeg(pixels, quality=self.quality, colorspace="BGR",
                                      colorsubsampling=self.subsampling)


class FrameCodec:
    """Splicing for frames of one size and one :class:`Settings` (thread-safe except :meth:`splice`,
    which reuses buffers: one codec per thread there).

    - :meth:`box`: the region of a crop rectangle: the pixels (x0, y0, x1, y1) of the MCUs it
      touches, clipped to the frame (a region at the frame's right or bottom edge keeps the
      frame's own edge, so the encoder pads it the same way).
    - :meth:`encode_full`: a whole frame with restart markers (backgrounds; the byte reference).
    - :meth:`plan`: the records of the background intervals a rectangle's region touches.
    - :meth:`splice`: header + background scan with a region JPEG spliced in + EOI.
    """

    def __init__(self, height: int, width: int, settings: Settings) -> None:
        if settings.subsampling not in SUBSAMPLING_FACTORS:
            raise ValueError(f"unknown chroma subsampling {settings.subsampling!r}")
        self.height, self.width, self.settings = height, width, settings
        probe = settings.encode(np.zeros((height, width, 3), np.uint8))
        lay = self.layout = parse_jpeg(probe)
        if (lay.width, lay.height) != (width, height) or len(lay.comp_h) != 3:
            raise JpegError(f"the encoder wrote a {lay.width}x{lay.height} JPEG with {len(lay.comp_h)} components")
        self.mcu_w, self.mcu_h, self.mcux, self.mcuy = lay.mcu_w, lay.mcu_h, lay.mcux, lay.mcuy
        target = settings.interval_px // self.mcu_w if settings.interval_px else self.mcux // 2
        self.interval = restart_interval(self.mcux, max(1, target))
        self.nint = self.mcux * self.mcuy // self.interval
        self.huff = huffman_arrays(lay)
        self.header = np.frombuffer(dri_header(probe, lay, self.interval), np.uint8).copy()
        self._ref = np.frombuffer(probe[:lay.scan], np.uint8).copy()      # a region's header, but for its size
        self._info = np.empty((self.mcux * self.mcuy + 1, 1 + 4 * 3), np.int64)
        self._data = np.empty(0, np.uint8)
        self._scratch = np.empty(0, np.uint8)

    # -- geometry ----------------------------------------------------------------------------------
    def mcu_box(self, rect) -> tuple[int, int, int, int]:
        x1, y1, x2, y2 = (int(v) for v in rect)
        return x1 // self.mcu_w, y1 // self.mcu_h, -(-x2 // self.mcu_w), -(-y2 // self.mcu_h)

    def box(self, rect) -> tuple[int, int, int, int]:
        mx0, my0, mx1, my1 = self.mcu_box(rect)
        return (mx0 * self.mcu_w, my0 * self.mcu_h, min(self.width, mx1 * self.mcu_w),
                min(self.height, my1 * self.mcu_h))

    def records(self, rect) -> int:
        """The number of intervals a rectangle's region touches (one record each)."""
        mx0, my0, mx1, my1 = self.mcu_box(rect)
        k = self.interval
        return (my1 - my0) * ((mx1 - 1) // k - mx0 // k + 1)

    # -- backgrounds --------------------------------------------------------------------------------
    def encode_full(self, pixels: np.ndarray) -> bytes:
        """A whole frame, encoded with restart markers: what a splice reproduces byte for byte."""
        jpeg = self.settings.encode(pixels)
        lay = parse_jpeg(jpeg)
        if lay.tables != self.layout.tables or lay.scan != self.layout.scan:
            raise JpegError("the encoder's tables changed between two frames")
        s = np.frombuffer(jpeg, np.uint8)
        a, b = lay.scan, scan_end(jpeg)
        nmcu = self.mcux * self.mcuy
        out = np.empty(2 * (b - a) + 4 * self.nint + 64, np.uint8)
        h = self.huff
        n = _restart(s, a, b, self.interval, nmcu, h.blocks, 3, h.lut, h.dcenc, h.comp_dc, out,
                     np.empty(b - a + 16, np.uint8), np.empty((nmcu + 1, 13), np.int64))
        if n < 0:
            raise JpegError("the encoder's scan does not decode with its own tables")
        return self.header.tobytes() + out[:n].tobytes() + b"\xff\xd9"

    def plan(self, jpeg: bytes | np.ndarray, rect) -> np.ndarray:
        """The records [R, RECLEN] int32 of the intervals of ``rect``'s region in ``jpeg`` (a frame
        from :meth:`encode_full`); offsets count from the first byte after the header."""
        s = jpeg if isinstance(jpeg, np.ndarray) else np.frombuffer(jpeg, np.uint8)
        a, b = len(self.header), scan_end(s)
        recs = np.zeros((self.records(rect), RECLEN), np.int32)
        h = self.huff
        n = _plan_frame(s, a, b, self.interval, self.mcux, self.nint, np.array(self.mcu_box(rect), np.int64),
                        h.blocks, 3, h.lut, np.empty(b - a + 16, np.uint8),
                        np.empty((self.interval + 1, 13), np.int64), recs)
        if n != len(recs):
            raise JpegError("the background's scan does not decode")
        return recs

    # -- output frames ------------------------------------------------------------------------------
    def splice(self, scan: np.ndarray, recs: np.ndarray, region_jpeg: bytes, rect, out: np.ndarray) -> int:
        """Write header + ``scan`` (a background's bytes between header and EOI) with the region
        JPEG's MCUs in place of its own + EOI into ``out``; returns the size, or minus the room
        needed when ``out`` may be too small. ``region_jpeg``: :meth:`box`'s pixels encoded with
        these settings."""
        r = np.frombuffer(region_jpeg, np.uint8)
        a, b = self.layout.scan, len(r) - 2        # a region's header is as long as a frame's
        if len(r) < a + 2 or r[a - 14] != 0xFF or r[a - 13] != SOS or r[b] != 0xFF or r[b + 1] != EOI:
            raise JpegError("the region JPEG does not have this codec's header layout")
        need = len(self.header) + len(scan) + 2 * (b - a) + 16 * len(recs) + 64
        if len(out) < need:
            return -need
        if self._data.shape[0] < b - a + 16 or self._scratch.shape[0] < scan.shape[0] + 16:
            self._data = np.empty(2 * (b - a) + 4096, np.uint8)
            self._scratch = np.empty(scan.shape[0] + 4096, np.uint8)
        mx0, my0, mx1, my1 = self.mcu_box(rect)
        h = self.huff
        n = _splice(self.header, self._ref, self.layout.sof + 5, scan, recs, r, a, b, mx1 - mx0, my1 - my0, mx0, my0, h.blocks, 3, h.lut, h.dcenc,
                    h.comp_dc, out, self._data, self._scratch, self._info)
        if n == -3:
            raise JpegError("the region JPEG was not encoded with this codec's settings")
        if n < 0:
            raise JpegError("the region JPEG does not decode with this codec's tables")
        return n

    def idle(self, scan: np.ndarray, out: np.ndarray) -> int:
        """The background frame itself (header + ``scan`` + EOI) into ``out``; -1 when it does not fit."""
        n = len(self.header) + len(scan) + 2
        if len(out) < n:
            return -1
        hn = len(self.header)
        out[:hn] = self.header
        out[hn:n - 2] = scan
        out[n - 2:n] = (0xFF, EOI)
        return n


@dataclass(frozen=True)
class FrameParts:
    """What splicing one output frame needs of a prepared background frame (views, not copies)."""
    scan: np.ndarray          # uint8: the background's entropy-coded bytes (between header and EOI)
    recs: np.ndarray          # int32 [R, RECLEN]: its intervals the region touches
    region: np.ndarray        # uint8 [y1-y0, x1-x0, 3]: the region's pixels (BGR)
    rect: tuple[int, int, int, int]
    border: np.ndarray | None   # the (F+8) crop's packed border (synctalk paste), or None


class SpliceCompositor:
    """Paste + encode of one output frame by splicing: the region's pixels are copied, the face is
    pasted into them, the region alone is encoded and spliced into the background's JPEG. The
    ``output.encoder = "splice"`` path; one per process and frame size (it reuses its buffers)."""

    def __init__(self, codec: FrameCodec) -> None:
        self.codec = codec
        self.paster = FacePaster()
        self._region: np.ndarray | None = None
        self._out = np.empty(0, np.uint8)

    def composite_region(self, parts: FrameParts, face: np.ndarray, mode: str = "synctalk") -> np.ndarray:
        """The region's pixels with the face pasted in (a reused buffer)."""
        if self._region is None or self._region.shape != parts.region.shape:
            self._region = np.empty_like(parts.region)
        np.copyto(self._region, parts.region)
        x0, y0, _, _ = self.codec.box(parts.rect)
        x1, y1, x2, y2 = parts.rect
        if mode == "synctalk" and parts.border is None:
            raise ValueError("synctalk paste needs the frame's crop border")
        self.paster.paste(self._region, face, (x1 - x0, y1 - y0, x2 - x0, y2 - y0), mode, border=parts.border)
        return self._region

    def region_jpeg(self, parts: FrameParts, face: np.ndarray, mode: str = "synctalk") -> bytes:
        return self.codec.settings.encode(self.composite_region(parts, face, mode))

    def splice_into(self, parts: FrameParts, region_jpeg: bytes, out: np.ndarray) -> int:
        """The output JPEG into ``out``: its size, or minus the room it needs."""
        return self.codec.splice(parts.scan, parts.recs, region_jpeg, parts.rect, out)

    def splice_bytes(self, parts: FrameParts, region_jpeg: bytes) -> bytes:
        n = self.splice_into(parts, region_jpeg, self._out)
        if n < 0:
            self._out = np.empty(-n, np.uint8)
            n = self.splice_into(parts, region_jpeg, self._out)
        return self._out[:n].tobytes()

    def __call__(self, parts: FrameParts, face: np.ndarray, mode: str = "synctalk") -> bytes:
        return self.splice_bytes(parts, self.region_jpeg(parts, face, mode))
