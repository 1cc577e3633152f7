"""Inference core: ONNX Runtime sessions for one device, no sockets (used by the GPU worker).

One ``Run`` per batch. With IO binding (default) the inputs are bound where they lie in the
shared-memory ring and the output is bound to its place in the ring, so ONNX Runtime reads and
writes the ring directly (on CUDA: one host-to-device and one device-to-host copy, nothing else).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .avatar import GraphInfo, read_graph

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 50)     # GPU batch sizes (see InferenceCore.bucket)
ENCODER_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)   # GPU audio-encoder window counts
CUDA = "CUDAExecutionProvider"


class InferenceError(Exception):
    """A network could not be loaded or run."""


@dataclass
class LoadedModel:
    name: str
    path: Path
    session: ort.InferenceSession
    graph: GraphInfo
    loaded_at: float
    runs: int = 0


class InferenceCore:
    """Sessions of one device, least recently used first out when more than ``capacity``."""

    def __init__(self, device: int | None, capacity: int = 8, intra_op_threads: int = 0,
                 io_binding: bool = True) -> None:
        self.device = device
        self.capacity = capacity
        self.intra_op_threads = intra_op_threads
        self.io_binding = io_binding
        self.models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.on_progress: Callable[[], None] = lambda: None     # the worker's heartbeat during long loads
        self.encoders: dict[str, ort.InferenceSession] = {}
        if device is None:
            self.providers: list = [CPU]
        else:
            if hasattr(ort, "preload_dlls"):
                try:
                    ort.preload_dlls()
                except Exception as e:  # noqa: BLE001
                    log.warning("onnxruntime.preload_dlls failed: %s", e)
            if CUDA not in ort.get_available_providers():
                raise InferenceError(f"GPU {device} requested but this onnxruntime has no CUDAExecutionProvider "
                                     f"(available: {ort.get_available_providers()})")
            # heuristic algorithm choice: an exhaustive cuDNN search for every new batch size costs
            # hundreds of ms, and streams make batches of many sizes
            self.providers = [(CUDA, {"device_id": device, "cudnn_conv_algo_search": "HEURISTIC"}), CPU]
        self.provider = CPU if device is None else CUDA
        if device is not None:
            self._probe()

    def _probe(self) -> None:
        """Fail at boot, not on the first request, when the GPU cannot run a session."""
        from onnx import TensorProto, helper
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        try:
            sess = ort.InferenceSession(model.SerializeToString(), providers=self.providers)
        except Exception as e:  # noqa: BLE001
            raise InferenceError(f"GPU {self.device}: onnxruntime cannot create a CUDA session: {e}") from None
        if sess.get_providers()[0] != CUDA:
            raise InferenceError(f"GPU {self.device}: onnxruntime fell back to {sess.get_providers()[0]} "
                                 "(no usable CUDA device or CUDA/cuDNN libraries)")

    def load(self, name: str, path: Path) -> LoadedModel:
        m = self.models.get(name)
        if m is not None and m.path == path:
            self.models.move_to_end(name)
            return m
        graph = read_graph(path)
        opts = ort.SessionOptions()
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle intra-op threads must not spin: the compositors need those cores between batches
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        t0 = time.perf_counter()
        try:
            sess = ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as e:  # noqa: BLE001
            raise InferenceError(f"{path}: onnxruntime cannot load it: {e}") from None
        actual = sess.get_providers()[0]
        if actual != self.provider:
            raise InferenceError(f"{path}: session runs on {actual}, not {self.provider}")
        while len(self.models) >= self.capacity:
            old, _ = self.models.popitem(last=False)
            log.info("unloaded network %s (capacity %d)", old, self.capacity)
        m = LoadedModel(name, path, sess, graph, time.time())
        self._warm_up(m)
        self.models[name] = m
        log.info("loaded network %s on %s in %.0f ms", name, actual, 1000 * (time.perf_counter() - t0))
        return m

    def bucket(self, batch: int, limit: int) -> int:
        """The batch size to run: on a GPU, padded up to one of a few sizes (fewer shapes to tune
        and allocate for); on the CPU, the batch itself (padding would only cost time)."""
        if self.device is None:
            return batch
        return min(next((b for b in BUCKETS if b >= batch), limit), limit)

    def _warm_up(self, m: LoadedModel) -> None:
        """Runs at load so the first requests do not pay for allocations and kernel choice."""
        sizes = [m.graph.fixed_batch or 1] if self.device is None or m.graph.fixed_batch else list(BUCKETS)
        for b in sizes:
            image = np.zeros((b, *m.graph.image_shape), np.float32)
            audio = np.zeros((b, *m.graph.audio_shape), np.float32)
            out = np.empty((b, *m.graph.output_shape), np.float32)
            for _ in range(1 if len(sizes) > 1 else 2):
                self.run(m, image, audio, out)
                self.on_progress()
        m.runs = 0

    def encode_audio(self, path: str, windows: np.ndarray) -> np.ndarray:
        """The audio encoder ([N,1,80,16] mel windows -> [N,D] features), one Run for all windows.

        On a GPU the window count is padded to a power of two (at least 16), every size warmed up
        when the encoder is loaded: a stream job's window count varies from job to job, and each
        new input shape costs CUDA/cuDNN set-up time that must not land on a live stream.
        """
        sess = self.encoders.get(path)
        if sess is None:
            try:
                sess = ort.InferenceSession(path, providers=self.providers)
            except Exception as e:  # noqa: BLE001
                raise InferenceError(f"{path}: onnxruntime cannot load the audio encoder: {e}") from None
            self.encoders[path] = sess
            if self.device is not None:
                for n in ENCODER_BUCKETS:
                    self._encode(sess, np.zeros((n, *windows.shape[1:]), np.float32))
                    self.on_progress()
        n = len(windows)
        if self.device is not None and n:
            size = next((b for b in ENCODER_BUCKETS if b >= n), n)
            padded = np.zeros((size, *windows.shape[1:]), np.float32)
            padded[:n] = windows
            return self._encode(sess, padded)[:n]
        return self._encode(sess, np.ascontiguousarray(windows, np.float32))

    @staticmethod
    def _encode(sess: ort.InferenceSession, windows: np.ndarray) -> np.ndarray:
        return sess.run(None, {sess.get_inputs()[0].name: windows})[0]

    def unload(self, name: str) -> bool:
        return self.models.pop(name, None) is not None

    def run(self, model: LoadedModel, image: np.ndarray, audio: np.ndarray, out: np.ndarray) -> None:
        """One Run over the whole batch; ``out`` (in the ring) receives the network output."""
        g = model.graph
        if g.fixed_batch not in (None, image.shape[0]):
            # a graph exported with a fixed batch: run it in fixed-size pieces, the last one padded
            step, n = g.fixed_batch, image.shape[0]
            for s in range(0, n, step):
                e = min(s + step, n)
                if e - s == step:
                    self.run(model, image[s:e], audio[s:e], out[s:e])
                    continue
                pad = [np.zeros((step, *a.shape[1:]), np.float32) for a in (image, audio, out)]
                pad[0][:e - s], pad[1][:e - s] = image[s:e], audio[s:e]
                self.run(model, *pad)
                out[s:e] = pad[2][:e - s]
            return
        if self.io_binding:
            binding = model.session.io_binding()
            for name, arr in ((g.image_input, image), (g.audio_input, audio)):
                binding.bind_input(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
            binding.bind_output(g.output, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            model.session.run_with_iobinding(binding)
        else:
            res = model.session.run([g.output], {g.image_input: image, g.audio_input: audio})[0]
            np.copyto(out, res)
        model.runs += 1
