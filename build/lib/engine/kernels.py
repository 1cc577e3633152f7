"""Compute kernels: plain functions, no sockets, no processes (REFERENCE.md sections 2 to 4).

- :func:`frame_index` maps a running frame number to an avatar frame (ping-pong or modulo).
- :func:`cut_crop` cuts a frame's crop rectangle and resizes it to (F+8) x (F+8), bicubic: the
  SyncTalk_2D "328" image whose inner F x F part is the network's face.
- :func:`fill_visual` builds the network image input (reference + masked face, /255, CHW) from
  those crops, straight into the ring.
- :func:`paste_face` puts one network output back into a frame (328-border bicubic, or stretch).
- :class:`FrameCompositor` does background copy + paste + JPEG for one frame, reusing buffers.
"""
from __future__ import annotations

import cv2
import numba
import numpy as np
import simplejpeg

BORDER = 4                  # SyncTalk_2D keeps a 4-pixel border of original pixels around the face


def frame_index(k: int | np.ndarray, n: int, wrap: str = "pingpong") -> int | np.ndarray:
    """Avatar frame used for running frame ``k`` of an avatar with ``n`` frames."""
    if n <= 1:
        return k * 0
    if wrap == "modulo":
        return k % n
    period = 2 * (n - 1)
    p = k % period
    return np.where(p < n, p, period - p) if isinstance(p, np.ndarray) else (p if p < n else period - p)


def mask_box(face: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the blacked-out part of the masked face: x in [5, F-5), y in [5, F-10)."""
    return 5, face - 10, 5, face - 5


def cut_crop(frame: np.ndarray, rect: tuple[int, int, int, int], face: int) -> np.ndarray:
    """The (F+8) x (F+8) bicubic resize of ``frame[y1:y2, x1:x2]`` (uint8, HWC)."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    side = face + 2 * BORDER
    return cv2.resize(frame[y1:y2, x1:x2], (side, side), interpolation=cv2.INTER_CUBIC)


@numba.njit(cache=True, nogil=True)
def _fill_visual(crops: np.ndarray, idx: np.ndarray, out: np.ndarray, my0: int, my1: int, mx0: int,
                 mx1: int) -> None:
    b_count, f = out.shape[0], out.shape[2]
    scale = np.float32(1.0 / 255.0)
    for b in range(b_count):
        k = idx[b]
        for y in range(f):
            for x in range(f):
                masked = my0 <= y < my1 and mx0 <= x < mx1
                for c in range(3):
                    v = np.float32(crops[k, y + 4, x + 4, c]) * scale
                    out[b, c, y, x] = v
                    out[b, 3 + c, y, x] = 0.0 if masked else v


def fill_visual(crops: np.ndarray, out: np.ndarray, indices: np.ndarray | None = None) -> None:
    """``crops[indices]`` ([N, F+8, F+8, 3] uint8 BGR, read in place) -> ``out`` [B, 6, F, F] float32
    (reference, masked); without ``indices`` the first B crops."""
    f = out.shape[2]
    idx = np.arange(out.shape[0], dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    if len(idx) != out.shape[0]:
        raise ValueError(f"{len(idx)} frame indices for a batch of {out.shape[0]}")
    _fill_visual(crops, idx, out, *mask_box(f))


@numba.njit(cache=True, nogil=True)
def _face_to_u8(face: np.ndarray, dst: np.ndarray, off: int) -> None:
    """CHW float 0..1 -> HWC uint8 (x255, clamped, rounded) into dst[off:off+F, off:off+F]."""
    f = face.shape[1]
    for y in range(f):
        for x in range(f):
            for c in range(3):
                v = face[c, y, x] * np.float32(255.0) + np.float32(0.5)
                if v < 0:
                    v = 0
                elif v > 255:
                    v = 255
                dst[y + off, x + off, c] = np.uint8(v)


def face_to_u8(face: np.ndarray, dst: np.ndarray | None = None, offset: int = 0) -> np.ndarray:
    f = face.shape[1]
    if dst is None:
        dst = np.empty((f, f, 3), np.uint8)
    _face_to_u8(face, dst, offset)
    return dst


def paste_face(frame: np.ndarray, face: np.ndarray, rect: tuple[int, int, int, int], crop: np.ndarray | None,
               mode: str = "synctalk", scratch: np.ndarray | None = None) -> None:
    """Write network output ``face`` [3,F,F] (0..1, BGR) into ``frame`` inside ``rect``, in place.

    ``synctalk``: the face goes into the (F+8) crop ``crop`` at [4:F+4], which is resized to the
    rectangle bicubic (the border keeps original pixels). ``stretch``: the seed's Go compositor,
    the face alone resized to the rectangle, bilinear.
    """
    x1, y1, x2, y2 = (int(v) for v in rect)
    w, h = x2 - x1, y2 - y1
    if mode == "stretch":
        small = face_to_u8(face)
        frame[y1:y2, x1:x2] = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        return
    if crop is None:
        raise ValueError("synctalk paste needs the frame's (F+8) crop")
    work = scratch if scratch is not None and scratch.shape == crop.shape else np.empty_like(crop)
    work[...] = crop
    face_to_u8(face, work, BORDER)
    frame[y1:y2, x1:x2] = cv2.resize(work, (w, h), interpolation=cv2.INTER_CUBIC)


class FrameCompositor:
    """Background copy + paste-back + JPEG encode for frames of one size; reuses its buffers."""

    def __init__(self, quality: int = 75, subsampling: str = "420", fastdct: bool = True) -> None:
        self.quality = quality
        self.subsampling = subsampling
        self.fastdct = fastdct
        self._frame: np.ndarray | None = None
        self._scratch: np.ndarray | None = None

    def composite(self, background: np.ndarray, face: np.ndarray, rect: tuple[int, int, int, int],
                  crop: np.ndarray | None, mode: str = "synctalk") -> np.ndarray:
        if self._frame is None or self._frame.shape != background.shape:
            self._frame = np.empty_like(background)
        if crop is not None and (self._scratch is None or self._scratch.shape != crop.shape):
            self._scratch = np.empty_like(crop)
        np.copyto(self._frame, background)
        paste_face(self._frame, face, rect, crop, mode, self._scratch)
        return self._frame

    def encode(self, frame: np.ndarray) -> bytes:
        return simplejpeg.encode_jpeg(frame, quality=self.quality, colorspace="BGR",
                                      colorsubsampling=self.subsampling, fastdct=self.fastdct)

    def __call__(self, background: np.ndarray, face: np.ndarray, rect: tuple[int, int, int, int],
                 crop: np.ndarray | None, mode: str = "synctalk") -> bytes:
        return self.encode(self.composite(background, face, rect, crop, mode))
