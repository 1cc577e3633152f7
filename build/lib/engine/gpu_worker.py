"""The GPU worker: one process per (GPU, slot), running whole batches from its ring.

Messages (backend channel, JSON; see ``engine/front.py``)::

    front -> worker  {"t": "run", "slot", "seq", "model", "onnx", "batch", "image", "audio",
                      "fill": null | {"avatar": segment, "indices": [...]}}
                     {"t": "load", "model", "onnx"}  {"t": "unload", "model"}  {"t": "drop", "avatar": segment}
    worker -> front  {"t": "ready", "provider", "device"}
                     {"t": "inferred", "slot", "seq", "ms", "models": [...]}
                     {"t": "failed", "slot", "seq", "code", "message"}
                     {"t": "models", "models": [...]}   (after load / unload)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import zmq

from . import protocol as P
from .avatar import AttachedAvatars, AvatarError
from .inference import InferenceCore, InferenceError
from .kernels import fill_visual
from .process import Role, send_msg
from .ring import BatchRing, SlotState

log = logging.getLogger(__name__)


class GpuWorker(Role):
    role = "gpu"

    def __init__(self, cfg, idx: int, hb_slot: int, device: int | None, ring_name: str) -> None:
        super().__init__(cfg, idx, hb_slot)
        self.device = device
        self.ring_name = ring_name

    def init_process(self) -> None:
        self.core = InferenceCore(self.device, self.cfg.capacity.models_per_device,
                                  self.cfg.gpu.intra_op_threads, self.cfg.gpu.io_binding)
        self.core.on_progress = self.beat
        self.ring = BatchRing.attach(self.ring_name)
        self.avatars = AttachedAvatars()
        self.ctx = zmq.Context()
        self.sock = self.backend_socket(self.ctx)
        fill_visual(np.zeros((1, 24, 24, 3), np.uint8), np.empty((1, 6, 16, 16), np.float32))  # compile now
        log.info("GPU worker %d on %s (device %s)", self.idx, self.core.provider, self.device)
        for name, mc in self.cfg.models.items():
            # preload the networks of preloaded avatars that prefer this device (or any, on worker 0)
            if mc.preload and (mc.preferred_gpu == self.device or (mc.preferred_gpu is None and self.idx == 0)):
                path = self.cfg.models_dir / (mc.path or name) / "checkpoint" / "model_best.onnx"
                try:
                    self.core.load(name, path)
                except (InferenceError, AvatarError) as e:
                    log.error("preload of %s failed: %s", name, e)
        encoder = self.cfg.models_dir / self.cfg.streams.audio_encoder
        if encoder.is_file():
            try:
                self.core.encode_audio(str(encoder), np.zeros((16, 1, 80, 16), np.float32))
            except InferenceError as e:
                log.error("audio encoder: %s", e)
        send_msg(self.sock, {"t": "ready", "provider": self.core.provider, "device": self.device,
                             "models": list(self.core.models)})

    def run(self) -> None:
        self.serve()

    def handle_load(self, msg: dict) -> None:
        try:
            self.core.load(msg["model"], Path(msg["onnx"]))
        except (InferenceError, AvatarError) as e:
            log.error("loading network %s failed: %s", msg["model"], e)
        send_msg(self.sock, {"t": "models", "models": list(self.core.models)})

    def handle_unload(self, msg: dict) -> None:
        self.core.unload(msg["model"])
        send_msg(self.sock, {"t": "models", "models": list(self.core.models)})

    def handle_drop(self, msg: dict) -> None:
        self.avatars.drop(msg["avatar"])

    def handle_run(self, msg: dict) -> None:
        slot, seq, batch = msg["slot"], msg["seq"], msg["batch"]
        if not self.ring.check(slot, seq, SlotState.QUEUED):
            log.warning("stale job for slot %d (seq %d)", slot, seq)
            return
        self.ring.set_state(slot, SlotState.RUNNING)
        try:
            model = self.core.load(msg["model"], Path(msg["onnx"]))
            g = model.graph
            run_batch = self.core.bucket(batch, self.ring.geometry.max_batch)   # rows past batch: ignored
            image = self.ring.visual(slot, (run_batch, *g.image_shape))
            audio = self.ring.audio(slot, (run_batch, *g.audio_shape))
            out = self.ring.output(slot, (run_batch, *g.output_shape))
            t0 = time.perf_counter()
            stream = msg.get("stream")
            if stream is not None and stream["idle"]:
                t1 = t2 = time.perf_counter()            # silence: no network, compositors send backgrounds
            else:
                if stream is not None:
                    audio = self._stream_audio(slot, stream, run_batch, g.audio_shape)
                fill = msg.get("fill")
                if fill is not None:
                    view = self.avatars.get(fill["avatar"])
                    idx = np.asarray(fill["indices"], np.int64)
                    fill_visual(view.crops, image[:len(idx)], idx)
                t1 = time.perf_counter()
                self.core.run(model, image, audio, out)
                t2 = time.perf_counter()
        except (InferenceError, AvatarError, ValueError, OSError) as e:
            send_msg(self.sock, {"t": "failed", "slot": slot, "seq": seq, "code": P.MODEL_ERROR, "message": str(e)})
            return
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types on bad runs
            log.exception("run failed")
            send_msg(self.sock, {"t": "failed", "slot": slot, "seq": seq, "code": P.MODEL_ERROR,
                                 "message": f"inference failed: {e}"})
            return
        self.ring.set_state(slot, SlotState.INFERRED)
        send_msg(self.sock, {"t": "inferred", "slot": slot, "seq": seq, "ms": 1000 * (t2 - t1),
                             "prep_ms": 1000 * (t1 - t0), "models": list(self.core.models)})

    def _stream_audio(self, slot: int, stream: dict, batch: int, shape: tuple[int, ...]) -> np.ndarray:
        """Stream batch: mel windows in the ring -> audio encoder -> each frame's [32,16,16] input.

        Segment s holds frames [a, a+count) of one stream and the windows of frames a-8+pad .. ;
        frame a+j's input is the encoder vectors of frames a+j-8 .. a+j+7, zeros outside the clip.
        """
        segs = stream["segments"]
        nwin = sum(s["nwin"] for s in segs)
        windows = self.ring.audio(slot, (nwin, 1, 80, 16))
        enc = self.core.encode_audio(stream["encoder"], windows) if nwin else np.zeros((0, 512), np.float32)
        audio = np.zeros((batch, *shape), np.float32)
        row = w = 0
        for s in segs:
            n, count, pad = s["nwin"], s["count"], s["pad_before"]
            padded = np.zeros((count + 15, enc.shape[1]), np.float32)
            padded[pad:pad + n] = enc[w:w + n]
            for j in range(count):
                audio[row + j] = padded[j:j + 16].reshape(shape)
            row += count
            w += n
        return audio

    def shutdown(self) -> None:
        if hasattr(self, "avatars"):
            self.avatars.close()
        if hasattr(self, "ring"):
            self.ring.close()
        if hasattr(self, "ctx"):
            self.ctx.destroy(linger=0)
