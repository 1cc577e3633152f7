"""Avatars: their decoded frames in shared memory (the folder layout on disk and its checks are in
:mod:`engine.avatars.disk`, REFERENCE.md section 6).

In shared memory, one segment per loaded avatar, created and unlinked by the front's
:class:`~engine.avatars.store.AvatarStore`, attached read-only by every other process. Two layouts:
``output.encoder = "splice"`` (the default) keeps each frame's background JPEG and the pixels a
paste can change (:mod:`engine.avatars.spliced`); ``"full"`` keeps the decoded frames, here::

    0            JSON header (layout, name, n, h, w, face), padded to 4096 bytes
    rects_off    int32   [n, 4]                 crop rectangles
    frames_off   uint8   [n, h, w, 3]           backgrounds, BGR, 3 bytes per pixel
    crops_off    uint8   [n, F+8, F+8, 3]       each frame's bicubic crop (the network face is
                                                its inner F x F), so neither inference nor paste-back
                                                cuts and resizes it again
"""
from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.avatars.disk import AvatarError, AvatarFiles, check_frame_size, read_rects
from engine.avatars.disk import decode_frame as _decode
from engine.kernels.image import cut_crop
from engine.runtime.shm import Segment

HEADER_BYTES = 4096


def _layout(n: int, h: int, w: int, face: int) -> dict[str, int]:
    side = face + 8
    rects_off = HEADER_BYTES
    frames_off = (rects_off + n * 16 + 4095) // 4096 * 4096
    crops_off = (frames_off + n * h * w * 3 + 4095) // 4096 * 4096
    total = crops_off + n * side * side * 3
    return {"rects_off": rects_off, "frames_off": frames_off, "crops_off": crops_off, "total": total}


def avatar_bytes(n: int, h: int, w: int, face: int) -> int:
    """Segment size of an avatar in the decoded (``output.encoder = "full"``) layout; the spliced
    layout's is :func:`engine.avatars.spliced.estimate_bytes` (exact once built: ``view.nbytes``)."""
    return _layout(n, h, w, face)["total"]


class AvatarView:
    """Numpy views of one avatar in shared memory, decoded layout (any process)."""

    layout = "decoded"

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        raw = bytes(segment.buf[:HEADER_BYTES]).rstrip(b"\0")
        meta = json.loads(raw)
        self.meta = meta
        self.name: str = meta["name"]
        n, h, w, face = meta["n"], meta["h"], meta["w"], meta["face"]
        side = face + 8
        lay = _layout(n, h, w, face)
        self.n, self.height, self.width, self.face = n, h, w, face
        self.rects = segment.array((n, 4), np.int32, lay["rects_off"])
        self.frames = segment.array((n, h, w, 3), np.uint8, lay["frames_off"])
        self.crops = segment.array((n, side, side, 3), np.uint8, lay["crops_off"])

    @property
    def nbytes(self) -> int:
        return self.segment.size

    def memory(self) -> dict[str, int]:
        """Bytes by part (``models`` shows them)."""
        return {"total": self.nbytes, "frames": self.frames.nbytes, "crops": self.crops.nbytes,
                "per_frame": self.nbytes // max(1, self.n)}

    def crops_for(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(crops, index into them) for :func:`~engine.kernels.image.fill_visual`: the stored crops."""
        return self.crops, np.asarray(indices, np.int64)

    @classmethod
    def attach(cls, segment_name: str) -> AvatarView:
        return cls(Segment(segment_name))

    @classmethod
    def create(cls, segment_name: str, files: AvatarFiles, face: int,
               progress: Callable[[int, int], None] | None = None, threads: int = 4) -> AvatarView:
        """Decode the avatar's frames once, straight into a new segment (the caller owns it)."""
        first = _decode(files.frames[0])
        if first.ndim != 3 or first.shape[2] != 3:
            raise AvatarError(f"{files.frames[0]}: expected a colour image")
        h, w = first.shape[:2]
        n = len(files.frames)
        rects = read_rects(files.rects, n, w, h)
        lay = _layout(n, h, w, face)
        seg = Segment(segment_name, lay["total"], create=True)
        try:
            header = json.dumps({"layout": "decoded", "name": files.name, "n": n, "h": h, "w": w,
                                 "face": face}).encode()
            seg.buf[:len(header)] = header
            view = cls(seg)
            view.rects[:] = rects
            done = 0

            def load(i: int) -> None:
                img = first if i == 0 else _decode(files.frames[i])
                check_frame_size(files.frames[i], img, h, w)
                view.frames[i] = img
                view.crops[i] = cut_crop(img, tuple(rects[i]), face)

            with ThreadPoolExecutor(max(1, threads)) as pool:
                for _ in pool.map(load, range(n)):
                    done += 1
                    if progress:
                        progress(done, n)
            return view
        except BaseException:
            seg.close()
            raise

    def close(self) -> None:
        self.rects = self.frames = self.crops = None  # type: ignore[assignment]
        self.segment.close()
