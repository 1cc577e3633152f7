"""The compositor: pastes network output into background frames and encodes JPEG.

Reads the network output from a GPU worker's ring and the backgrounds from the avatar's segment,
writes each JPEG back into the ring (the slot's consumed input area), so the front can send it
without another copy. A JPEG that does not fit there travels inline in the reply message.

The avatar's layout decides how (``output.encoder``): a spliced avatar's frame is its face region
pasted, encoded alone and spliced into the background's JPEG (:class:`~engine.kernels.splice.SpliceCompositor`),
and an idle frame is the background's JPEG as it is; a decoded avatar's frame is pasted and encoded
whole (:class:`~engine.kernels.image.FrameCompositor`). ``idle`` is one boolean for the whole chunk or
a list with one per frame (silent frames show the avatar's own frame, the network is not run).

Messages::

    front -> compositor  {"t": "paste", "ring", "slot", "seq", "start", "count", "avatar", "indices",
                          "face": [3, F, F], "mode", "quality", "subsampling", "idle": bool | [bool, ...]}
                         {"t": "drop", "avatar": segment}
    compositor -> front  {"t": "ready"}
                         {"t": "pasted", "ring", "slot", "seq", "start", "sizes": [...],
                          "inline": [i, ...]} + one frame per inline JPEG
                         {"t": "failed", "ring", "slot", "seq", "start", "message"}
"""
from __future__ import annotations

import logging
import time

import cv2
import numpy as np
import zmq

from engine.avatars.attached import AttachedAvatars
from engine.kernels.image import FrameCompositor, crop_border
from engine.kernels.splice import FrameCodec, FrameParts, Settings, SpliceCompositor
from engine.runtime.process import Role, send_msg
from engine.runtime.ring import BatchRing

log = logging.getLogger("engine.compositor")


class ChunkCompositor:
    """One chunk of a batch: network outputs in a ring slot -> JPEGs written back into the slot.
    No sockets (the process loop is :class:`Compositor`); keeps the kernels it made for reuse."""

    def __init__(self) -> None:
        self.encoders: dict[tuple[int, str], FrameCompositor] = {}
        self.splicers: dict[tuple[int, int, Settings], SpliceCompositor] = {}

    def splicer(self, view) -> SpliceCompositor:
        """The splice kernel for a spliced avatar's frame size and settings."""
        key = (view.height, view.width, view.settings)
        sc = self.splicers.get(key)
        if sc is None:
            sc = self.splicers[key] = SpliceCompositor(FrameCodec(view.height, view.width, view.settings))
        if not np.array_equal(sc.codec.header, view.header):
            raise ValueError(f"avatar {view.name} was prepared by another JPEG encoder version; reload it")
        return sc

    def encoder(self, quality: int, subsampling: str) -> FrameCompositor:
        enc = self.encoders.get((quality, subsampling))
        if enc is None:
            enc = self.encoders[(quality, subsampling)] = FrameCompositor(quality, subsampling)
        return enc

    def __call__(self, view, ring: BatchRing, slot: int, start: int, indices: list[int], face: list[int],
                 mode: str, quality: int, subsampling: str,
                 idle: bool | list[bool] = False) -> tuple[list[int], list[int], list[bytes]]:
        """Frames ``start .. start+len(indices)`` of the slot; returns (sizes, inline frame numbers,
        inline JPEGs): a JPEG that does not fit its area in the slot travels inline."""
        count = len(indices)
        if isinstance(idle, list) and len(idle) != count:
            raise ValueError(f"{len(idle)} idle flags for a chunk of {count} frames")
        out = ring.output(slot, (start + count, *face))
        sizes, inline, blobs = [], [], []
        spliced = view.layout == "splice"
        sc = self.splicer(view) if spliced else None
        enc = None if spliced else self.encoder(quality, subsampling)
        for j, k in enumerate(indices):
            i = start + j
            silent = idle[j] if isinstance(idle, list) else idle
            area = np.frombuffer(ring.jpeg_area(slot, i), np.uint8)
            jpeg: bytes | None = None
            if sc is not None:
                if silent:                                  # the background's own JPEG: no encode
                    n = sc.codec.idle(view.scan(k), area)
                    if n < 0:
                        jpeg = sc.codec.header.tobytes() + view.scan(k).tobytes() + b"\xff\xd9"
                else:
                    parts = view.parts(k, border=mode == "synctalk")
                    region = sc.region_jpeg(parts, out[i], mode)
                    n = sc.splice_into(parts, region, area)
                    if n < 0:
                        jpeg = sc.splice_bytes(parts, region)
            else:
                if silent:
                    jpeg = enc.encode(view.frames[k])       # silence: the avatar's own frame
                else:
                    crop = view.crops[k] if mode == "synctalk" else None
                    jpeg = enc(view.frames[k], out[i], tuple(view.rects[k]), crop, mode)
                n = len(jpeg)
                if n <= len(area):
                    area[:n] = np.frombuffer(jpeg, np.uint8)
                    jpeg = None
            if jpeg is not None:
                inline.append(i)
                blobs.append(jpeg)
                n = len(jpeg)
            sizes.append(n)
        return sizes, inline, blobs


class Compositor(Role):
    role = "compositor"

    def init_process(self) -> None:
        cv2.setNumThreads(1)            # one process per core already
        self.rings: dict[str, BatchRing] = {}
        self.avatars = AttachedAvatars()
        self.chunks = ChunkCompositor()
        self.ctx = zmq.Context()
        self.sock = self.backend_socket(self.ctx)
        warm_up_kernels()                # the numba kernels compiled before ready, not on the first request
        send_msg(self.sock, {"t": "ready"})

    def run(self) -> None:
        self.serve()

    def handle_drop(self, msg: dict) -> None:
        self.avatars.drop(msg["avatar"])

    def _ring(self, name: str) -> BatchRing:
        ring = self.rings.get(name)
        if ring is None:
            ring = self.rings[name] = BatchRing.attach(name)
        return ring

    def handle_paste(self, msg: dict) -> None:
        base = {k: msg[k] for k in ("ring", "slot", "seq", "start")}
        t0 = time.perf_counter()
        try:
            ring = self._ring(msg["ring"])
            view = self.avatars.get(msg["avatar"])
            sizes, inline, blobs = self.chunks(view, ring, msg["slot"], msg["start"], msg["indices"], msg["face"],
                                               msg["mode"], msg["quality"], msg["subsampling"],
                                               msg.get("idle") or False)
        except Exception as e:  # noqa: BLE001 - any failure becomes an error reply, the process serves on
            log.exception("paste failed")
            send_msg(self.sock, {"t": "failed", **base, "message": f"compositing failed: {e}"})
            return
        send_msg(self.sock, {"t": "pasted", **base, "sizes": sizes, "inline": inline,
                             "ms": 1000 * (time.perf_counter() - t0)}, *blobs)

    def shutdown(self) -> None:
        if hasattr(self, "avatars"):
            self.avatars.close()
        for ring in self.rings.values():
            ring.close()
        if hasattr(self, "ctx"):
            self.ctx.destroy(linger=0)


def warm_up_kernels() -> None:
    """Compile (or load from numba's cache) the kernels a compositor runs, so that a request never
    waits for it: with the argument types serving passes. numba compiles one version per type, and
    a read-only array is another type: a spliced avatar is planned from its JPEG's bytes (read-only)
    and spliced from its scans in shared memory (writable). Before 2026-12-06 the splice ran here on
    read-only scans, and each compositor compiled the writable version (seconds) at its first
    spliced frame until one had cached it."""
    fc = FrameCompositor()
    bg = np.zeros((64, 64, 3), np.uint8)
    face = np.zeros((3, 16, 16), np.float32)
    fc(bg, face, (8, 8, 40, 40), np.zeros((24, 24, 3), np.uint8), "synctalk")
    fc(bg, face, (8, 8, 40, 40), None, "stretch")
    codec = FrameCodec(64, 64, Settings())
    jpeg = codec.encode_full(bg)
    rect = (8, 8, 40, 40)
    x0, y0, x1, y1 = codec.box(rect)
    scans = np.frombuffer(jpeg, np.uint8)[len(codec.header):-2].copy()                 # writable, as in shared memory
    parts = FrameParts(scans, codec.plan(jpeg, rect), bg[y0:y1, x0:x1].copy(), rect,
                       crop_border(np.zeros((24, 24, 3), np.uint8)))
    SpliceCompositor(codec)(parts, face, "synctalk")
