"""The GPU worker: one process per (GPU, slot), running whole batches from its ring.

Messages (backend channel, JSON; see ``engine/front/front.py``)::

    front -> worker  {"t": "run", "slot", "seq", "model", "onnx", "batch", "image", "audio",
                      "fill": null | {"avatar": segment, "indices": [...]}}
                     {"t": "load", "model", "onnx"}  {"t": "unload", "model"}  {"t": "drop", "avatar": segment}
    worker -> front  {"t": "ready", "provider", "device", "models": [...], "loading": [...], "stats": {...}}
                     {"t": "inferred", "slot", "seq", "ms", "models": [...], "stats"?: {...}}
                     {"t": "failed", "slot", "seq", "code", "message"}
                     {"t": "models", "models": [...], "loading": [...], "failed": {name: message}, "stats": {...}}

``stats`` (:meth:`engine.worker.inference.InferenceCore.stats` plus ``loading``) is what ``health``
shows for the worker: the sizes each network and encoder runs at, ``cold_runs``, and per network
its precision, execution path and (fp16) conversion error. ``inferred`` carries it only when it
changed.

Loading never stalls serving: a ``load`` (or a ``run`` for a network this worker does not hold)
hands the network to the loader thread, which converts (fp16), creates the session and warms it
up at every batch size while this thread keeps running the jobs of the networks already loaded.
A ``run`` for a network still loading is parked and runs once it is ready; the front avoids that
by sending jobs only to workers that report the network loaded (``models``), so parked jobs are the
exception (a network evicted under the front's feet), not the rule.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from engine import protocol as P
from engine.avatars.attached import AttachedAvatars
from engine.avatars.disk import AvatarError
from engine.kernels.image import fill_visual
from engine.runtime.process import Role, send_msg
from engine.runtime.ring import BatchRing, SlotState
from engine.worker.inference import InferenceCore, InferenceError
from engine.worker.loaded import LoadedModel

log = logging.getLogger("engine.gpu_worker")


class GpuWorker(Role):
    role = "gpu"

    def __init__(self, cfg, idx: int, hb_slot: int, device: int | None, ring_name: str) -> None:
        super().__init__(cfg, idx, hb_slot)
        self.device = device
        self.ring_name = ring_name

    def init_process(self) -> None:
        self.core = InferenceCore.from_config(self.device, self.cfg)
        self.core.on_progress = self.beat
        self.ring = BatchRing.attach(self.ring_name)
        self.avatars = AttachedAvatars()
        self.ctx = zmq.Context()
        self.sock = self.backend_socket(self.ctx)
        fill_visual(np.zeros((1, 24, 24, 3), np.uint8), np.empty((1, 6, 16, 16), np.float32))  # compile now
        log.info("GPU worker %d on %s (device %s)", self.idx, self.core.provider, self.device)
        self.loads: queue.Queue = queue.Queue()
        self.done: deque[tuple[str, Path, str, Any]] = deque()
        self.loading: dict[str, tuple[Path, str]] = {}       # name -> (network, precision) being prepared
        self.parked: dict[str, list[dict]] = {}              # run messages waiting for their network
        self.failed: dict[str, str] = {}                     # load failures not yet reported
        self.discard: set[str] = set()                       # unloaded while loading
        self.inbox: deque[bytes] = deque()                   # messages read ahead (see _read_ahead)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self._sent_sig: Any = None
        self.loader = threading.Thread(target=self._loader, name="network-loader", daemon=True)
        self.loader.start()
        encoder = self.cfg.models_dir / self.cfg.streams.audio_encoder
        if encoder.is_file():
            try:
                self.core.load_encoder(str(encoder))
            except InferenceError as e:
                log.error("audio encoder: %s", e)
        for name, mc in self.cfg.models.items():
            # preloaded avatars: every worker of their preferred GPU (of every GPU without one) holds the
            # network from the start, since jobs go only to workers holding it
            pref = mc.preferred_gpu if mc.preferred_gpu in self.cfg.gpu_devices() else None
            if mc.preload and pref in (None, self.device):
                path = self.cfg.models_dir / (mc.path or name) / "checkpoint" / "model_best.onnx"
                try:
                    self.core.load(name, path, self.cfg.precision(name), self._encoder_for(path))
                except (InferenceError, AvatarError) as e:
                    log.error("preload of %s failed: %s", name, e)
        send_msg(self.sock, {"t": "ready", "provider": self.core.provider, "device": self.device,
                             "models": list(self.core.models), "loading": [], "stats": self._stats()})

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        self.watch_signals(poller)
        while not self.stopping:
            self.beat()
            # a network installed but not finished on this thread (engine/worker/inference.py: finish_step)
            # takes one short step whenever no message waits; never while the loader works
            finishing = self.core.has_todo() and not self.loading
            events = dict(poller.poll(0 if finishing or self.inbox else 1000))
            if not events and finishing and not self.inbox:
                self.core.finish_step()
                if self._signature() != self._sent_sig:
                    self._send_models()
                continue
            if self.signal_r in events:
                self.drain_signals()
            if self.wake_r in events:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            while self.done:
                self._read_ahead()
                self._loaded(*self.done.popleft())
            if self.sock in events or self.inbox:
                for _ in range(64):
                    if self.inbox:
                        raw = self.inbox.popleft()
                    else:
                        try:
                            raw = self.sock.recv_multipart(zmq.NOBLOCK)[0]
                        except zmq.Again:
                            break
                    self._dispatch(raw)
                    if self.done:                   # a load finished: install it before the next job
                        break

    def _read_ahead(self) -> None:
        """Read every message waiting on the socket into the inbox, so that an install knows
        which networks have jobs on their way (those are never evicted)."""
        while True:
            try:
                self.inbox.append(self.sock.recv_multipart(zmq.NOBLOCK)[0])
            except zmq.Again:
                return

    def _busy(self) -> set[str]:
        """Networks with work in flight in this worker: parked jobs and jobs read ahead."""
        busy = set(self.parked)
        for raw in self.inbox:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if msg.get("t") == "run":
                busy.add(msg.get("model"))
        return busy

    def _dispatch(self, raw: bytes) -> None:
        msg = json.loads(raw)
        handler = getattr(self, f"handle_{msg.get('t')}", None)
        if handler is None:
            log.warning("%s: unknown message %r", self.label, msg.get("t"))
            return
        handler(msg)

    # -- loading (off the serving path) ------------------------------------------------------------
    def _encoder_for(self, onnx_path: Path) -> str | None:
        """The avatar's audio encoder, found as the front finds it (its folder, then models_root)."""
        name = self.cfg.streams.audio_encoder
        for cand in (onnx_path.parent.parent / name, self.cfg.models_dir / name):
            if cand.is_file():
                return str(cand)
        return None

    def _request(self, name: str, path: Path) -> bool:
        """Start loading ``name`` unless it is loaded or loading; True when it is not ready yet."""
        precision = self.cfg.precision(name)
        m = self.core.models.get(name)
        if m is not None and m.path == path and m.precision == precision:
            return False
        self.discard.discard(name)
        if name not in self.loading:
            self.loading[name] = (path, precision)
            self.loads.put((name, path, precision, self._encoder_for(path)))
        return True

    def _loader(self) -> None:
        """Loader thread: prepare networks one after the other; the worker's thread installs them."""
        while True:
            item = self.loads.get()
            if item is None:
                return
            name, path, precision, encoder = item
            try:
                result: Any = self.core.prepare(name, path, precision, encoder)
            except Exception as e:  # noqa: BLE001 - reported to the front, never fatal
                result = e
            self.done.append((name, path, precision, result))
            try:
                os.write(self.wake_w, b"x")
            except OSError:
                return

    def _loaded(self, name: str, path: Path, precision: str, result: Any) -> None:
        """Worker thread: install a prepared network (or report its failure), run its parked jobs."""
        if self.loading.get(name) == (path, precision):
            del self.loading[name]
        parked = self.parked.pop(name, [])
        if isinstance(result, LoadedModel):
            if name in self.discard and not parked:
                self.discard.discard(name)
                log.info("network %s loaded after it was unloaded: dropped", name)
            else:
                self.core.install(result, self._busy() | {name})
                log.info("network %s ready (%s, %s) after %.0f ms", name, precision, result.mode, result.load_ms)
        else:
            message = str(result) if isinstance(result, (InferenceError, AvatarError)) else f"loading failed: {result}"
            log.error("loading network %s failed: %s", name, message)
            self.failed[name] = message
        self._send_models()
        for msg in parked:
            self.handle_run(msg)

    def _send_models(self) -> None:
        failed, self.failed = self.failed, {}
        send_msg(self.sock, {"t": "models", "models": list(self.core.models), "loading": sorted(self.loading),
                             "failed": failed, "stats": self._stats()})

    def _stats(self) -> dict[str, Any]:
        s = self.core.stats()
        s["loading"] = sorted(self.loading)
        self._sent_sig = self._signature()
        return s

    def _signature(self) -> Any:
        c = self.core
        return (c.cold_runs, tuple(c.models), tuple(self.loading),
                sum(len(m.shapes) for m in c.models.values()) + sum(len(e.shapes) for e in c.encoders.values()),
                tuple((not m.todo, len(m.fallback)) for m in c.models.values()))

    def handle_load(self, msg: dict) -> None:
        self._request(msg["model"], Path(msg["onnx"]))
        self._send_models()

    def handle_unload(self, msg: dict) -> None:
        name = msg["model"]
        self.core.unload(name)
        if name in self.loading:
            self.discard.add(name)
        self._send_models()

    def handle_drop(self, msg: dict) -> None:
        self.avatars.drop(msg["avatar"])

    # -- running -----------------------------------------------------------------------------------
    def handle_run(self, msg: dict) -> None:
        slot, seq, batch = msg["slot"], msg["seq"], msg["batch"]
        if not self.ring.check(slot, seq, SlotState.QUEUED):
            log.warning("stale job for slot %d (seq %d)", slot, seq)
            return
        try:
            pending = self._request(msg["model"], Path(msg["onnx"]))
        except (InferenceError, AvatarError, OSError) as e:
            send_msg(self.sock, {"t": "failed", "slot": slot, "seq": seq, "code": P.MODEL_ERROR, "message": str(e)})
            return
        if pending:
            self.parked.setdefault(msg["model"], []).append(msg)
            log.info("job for %s parked until its network is loaded", msg["model"])
            return
        self.ring.set_state(slot, SlotState.RUNNING)
        try:
            model = self.core.models[msg["model"]]
            self.core.models.move_to_end(msg["model"])
            g = model.graph
            rows = self.core.rows(model, batch)          # rows past batch: padding, ignored
            image = self.ring.visual(slot, (rows, *g.image_shape))
            audio = self.ring.audio(slot, (rows, *g.audio_shape))
            out = self.ring.output(slot, (rows, *g.output_shape))
            t0 = time.perf_counter()
            stream = msg.get("stream")
            if stream is not None and stream["idle"]:
                t1 = t2 = time.perf_counter()            # silence: no network, compositors send backgrounds
            else:
                if stream is not None:
                    audio = self._stream_audio(slot, stream, rows, g.audio_shape)
                fill = msg.get("fill")
                if fill is not None:
                    view = self.avatars.get(fill["avatar"])
                    crops, idx = view.crops_for(np.asarray(fill["indices"], np.int64))   # spliced: cut now
                    fill_visual(crops, image[:len(idx)], idx)
                t1 = time.perf_counter()
                self.core.run(model, image, audio, out, batch)
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
        reply = {"t": "inferred", "slot": slot, "seq": seq, "ms": 1000 * (t2 - t1), "prep_ms": 1000 * (t1 - t0),
                 "models": list(self.core.models)}
        if self._signature() != self._sent_sig:
            reply["stats"] = self._stats()
        send_msg(self.sock, reply)

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
        if hasattr(self, "loads"):
            self.loads.put(None)
            self.loader.join(10)
        if hasattr(self, "avatars"):
            self.avatars.close()
        if hasattr(self, "ring"):
            self.ring.close()
        if hasattr(self, "ctx"):
            self.ctx.destroy(linger=0)
        for fd in (getattr(self, "wake_r", None), getattr(self, "wake_w", None)):
            if fd is not None:
                os.close(fd)
