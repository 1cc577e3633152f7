"""The compositor: pastes network output into background frames and encodes JPEG.

Reads the network output from a GPU worker's ring and the backgrounds from the avatar's segment,
writes each JPEG back into the ring (the slot's consumed input area), so the front can send it
without another copy. A JPEG that does not fit there travels inline in the reply message.

Messages::

    front -> compositor  {"t": "paste", "ring", "slot", "seq", "start", "count", "avatar", "indices",
                          "face": [3, F, F], "mode", "quality", "subsampling", "idle"}
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
import zmq

from .avatar import AttachedAvatars
from .kernels import FrameCompositor
from .process import Role, send_msg
from .ring import BatchRing

log = logging.getLogger(__name__)


class Compositor(Role):
    role = "compositor"

    def init_process(self) -> None:
        cv2.setNumThreads(1)            # one process per core already
        self.rings: dict[str, BatchRing] = {}
        self.avatars = AttachedAvatars()
        self.encoders: dict[tuple[int, str], FrameCompositor] = {}
        self.ctx = zmq.Context()
        self.sock = self.backend_socket(self.ctx)
        self._warm_up()
        send_msg(self.sock, {"t": "ready"})

    def _warm_up(self) -> None:
        """Compile the numba kernels before reporting ready, not on the first request."""
        import numpy as np
        fc = FrameCompositor()
        bg = np.zeros((64, 64, 3), np.uint8)
        face = np.zeros((3, 16, 16), np.float32)
        fc(bg, face, (8, 8, 40, 40), np.zeros((24, 24, 3), np.uint8), "synctalk")
        fc(bg, face, (8, 8, 40, 40), None, "stretch")

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
            key = (msg["quality"], msg["subsampling"])
            enc = self.encoders.get(key)
            if enc is None:
                enc = self.encoders[key] = FrameCompositor(msg["quality"], msg["subsampling"])
            start, count = msg["start"], msg["count"]
            out = ring.output(msg["slot"], (start + count, *msg["face"]))
            sizes, inline, blobs = [], [], []
            for j, k in enumerate(msg["indices"]):
                i = start + j
                if msg.get("idle"):
                    jpeg = enc.encode(view.frames[k])          # silence: the avatar's own frame
                else:
                    crop = view.crops[k] if msg["mode"] == "synctalk" else None
                    jpeg = enc(view.frames[k], out[i], tuple(view.rects[k]), crop, msg["mode"])
                area = ring.jpeg_area(msg["slot"], i)
                if len(jpeg) <= len(area):
                    area[:len(jpeg)] = jpeg
                else:
                    inline.append(i)
                    blobs.append(jpeg)
                sizes.append(len(jpeg))
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
