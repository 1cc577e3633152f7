"""Compute kernels: plain functions, no sockets, no processes (REFERENCE.md sections 2 to 4).

- :func:`frame_index` maps a running frame number to an avatar frame (ping-pong or modulo).
- :func:`cut_crop` cuts a frame's crop rectangle and resizes it to (F+8) x (F+8), bicubic: the
  SyncTalk_2D "328" image whose inner F x F part is the network's face.
- :func:`fill_visual` builds the network image input (reference + masked face, /255, CHW) from
  those crops, straight into the ring.
- :class:`FacePaster` / :func:`paste_face` put one network output back into a frame (328-border
  bicubic, or stretch); the synctalk paste needs only the crop's 4-pixel border (:func:`crop_border`).
- :class:`FrameCompositor` does background copy + paste + JPEG of a whole frame, reusing buffers.
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


def cut_crop(frame: np.ndarray, rect: tuple[int, int, int, int], face: int,
             dst: np.ndarray | None = None) -> np.ndarray:
    """The (F+8) x (F+8) bicubic resize of ``frame[y1:y2, x1:x2]`` (uint8, HWC); it reads only the
    rectangle's pixels, so cutting it from any array holding them gives the same crop."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    side = face + 2 * BORDER
    return cv2.resize(frame[y1:y2, x1:x2], (side, side), dst=dst, interpolation=cv2.INTER_CUBIC)


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
def _face_planes(face: np.ndarray, planes: np.ndarray) -> None:
    """CHW float 0..1 -> CHW uint8 (x255, +0.5, clamped, truncated); plane by plane, so it vectorises."""
    c_count, h, w = face.shape
    for c in range(c_count):
        for y in range(h):
            for x in range(w):
                v = face[c, y, x] * np.float32(255.0) + np.float32(0.5)
                planes[c, y, x] = np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))


def face_to_u8(face: np.ndarray, dst: np.ndarray | None = None, offset: int = 0,
               planes: np.ndarray | None = None) -> np.ndarray:
    """Network output [3,F,F] 0..1 -> HWC uint8 (x255, clamped, rounded), into
    ``dst[offset:offset+F, offset:offset+F]`` when given. Two passes (planes, then OpenCV's channel
    merge) are ~25 x faster than one loop writing interleaved pixels."""
    f = face.shape[1]
    if planes is None or planes.shape != face.shape:
        planes = np.empty(face.shape, np.uint8)
    _face_planes(face, planes)
    merged = cv2.merge([planes[0], planes[1], planes[2]])
    if dst is None:
        return merged
    dst[offset:offset + f, offset:offset + f] = merged
    return dst


def border_size(face: int) -> int:
    """Pixels in the BORDER-wide frame of an (F+8) crop."""
    side = face + 2 * BORDER
    return side * side - face * face


def crop_border(crop: np.ndarray) -> np.ndarray:
    """The original-pixel border of an (F+8) crop, packed [border_size, 3]: top rows, bottom rows,
    then the left and right columns between them. All a synctalk paste needs of the crop."""
    b = BORDER
    return np.concatenate([crop[:b].reshape(-1, 3), crop[-b:].reshape(-1, 3),
                           crop[b:-b, :b].reshape(-1, 3), crop[b:-b, -b:].reshape(-1, 3)])


def fill_border(work: np.ndarray, border: np.ndarray) -> None:
    """Inverse of :func:`crop_border`: write the packed border into the (F+8) image ``work``."""
    b, side = BORDER, work.shape[0]
    f = side - 2 * b
    top = b * side * 3
    flat = border.reshape(-1)
    work[:b] = flat[:top].reshape(b, side, 3)
    work[-b:] = flat[top:2 * top].reshape(b, side, 3)
    col = f * b * 3
    work[b:-b, :b] = flat[2 * top:2 * top + col].reshape(f, b, 3)
    work[b:-b, -b:] = flat[2 * top + col:].reshape(f, b, 3)


class FacePaster:
    """Puts network output back into a frame (REFERENCE.md section 3), reusing its buffers.

    ``synctalk``: the face goes into the (F+8) crop at [4:F+4] (the border keeps original pixels,
    from the full ``crop`` or its packed ``border``), which is resized to the rectangle bicubic.
    ``stretch``: the seed's Go compositor, the face alone resized to the rectangle, bilinear.
    """

    def __init__(self) -> None:
        self._planes: np.ndarray | None = None
        self._work: np.ndarray | None = None

    def paste(self, frame: np.ndarray, face: np.ndarray, rect: tuple[int, int, int, int],
              mode: str = "synctalk", crop: np.ndarray | None = None, border: np.ndarray | None = None) -> None:
        x1, y1, x2, y2 = (int(v) for v in rect)
        f = face.shape[1]
        if self._planes is None or self._planes.shape != face.shape:
            self._planes = np.empty(face.shape, np.uint8)
        if mode == "stretch":
            small = face_to_u8(face, planes=self._planes)
            cv2.resize(small, (x2 - x1, y2 - y1), dst=frame[y1:y2, x1:x2], interpolation=cv2.INTER_LINEAR)
            return
        side = f + 2 * BORDER
        if self._work is None or self._work.shape[0] != side:
            self._work = np.empty((side, side, 3), np.uint8)
        work = self._work
        if crop is not None:
            work[...] = crop
        elif border is not None:
            fill_border(work, border)
        else:
            raise ValueError("synctalk paste needs the frame's (F+8) crop or its border")
        face_to_u8(face, work, BORDER, self._planes)
        cv2.resize(work, (x2 - x1, y2 - y1), dst=frame[y1:y2, x1:x2], interpolation=cv2.INTER_CUBIC)


def paste_face(frame: np.ndarray, face: np.ndarray, rect: tuple[int, int, int, int], crop: np.ndarray | None,
               mode: str = "synctalk", scratch: np.ndarray | None = None) -> None:
    """Write network output ``face`` [3,F,F] (0..1, BGR) into ``frame`` inside ``rect``, in place
    (see :class:`FacePaster`; ``synctalk`` needs the frame's (F+8) ``crop``)."""
    if mode != "stretch" and crop is None:
        raise ValueError("synctalk paste needs the frame's (F+8) crop")
    FacePaster().paste(frame, face, rect, mode, crop=crop)


class FrameCompositor:
    """Background copy + paste-back + JPEG encode of a whole frame, reusing its buffers: the
    ``output.encoder = "full"`` path (the splice path is :class:`engine.kernels.splice.SpliceCompositor`)."""

    def __init__(self, quality: int = 75, subsampling: str = "420") -> None:
        self.quality = quality
        self.subsampling = subsampling
        self._frame: np.ndarray | None = None
        self._paster = FacePaster()

    def composite(self, background: np.ndarray, face: np.ndarray, rect: tuple[int, int, int, int],
                  crop: np.ndarray | None, mode: str = "synctalk") -> np.ndarray:
        if self._frame is None or self._frame.shape != background.shape:
            self._frame = np.empty_like(background)
        np.copyto(self._frame, background)
        if mode != "stretch" and crop is None:
            raise ValueError("synctalk paste needs the frame's (F+8) crop")
        self._paster.paste(self._frame, face, rect, mode, crop=crop)
        return self._frame

    def encode(self, frame: np.ndarray) -> bytes:
        return simplejpeg.encode_jpeg(frame, quality=self.quality, colorspace="BGR",
                                      colorsubsampling=self.subsampling)

    def __call__(self, background: np.ndarray, face: np.ndarray, rect: tuple[int, int, int, int],
                 crop: np.ndarray | None, mode: str = "synctalk") -> bytes:
        return self.encode(self.composite(background, face, rect, crop, mode))
