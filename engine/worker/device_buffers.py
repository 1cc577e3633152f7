"""Per-bucket input and output tensors that live on the session's device, bound once: the
``device_buffers`` and ``cuda_graphs`` paths of :mod:`engine.worker.inference`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from engine.avatars.disk import GraphInfo

log = logging.getLogger("engine.inference")

GRAPH_ID = "gpu_graph_id"            # run option: which captured CUDA graph a run uses (-1: none)


@dataclass
class _BufferSet:
    image: Any
    audio: Any
    out: Any
    binding: Any
    options: Any
    bound: int = 0                # shared sessions: the network whose weights the binding holds (its token)


class DeviceBuffers:
    """Input and output OrtValues allocated once per bucket on the session's device, bound once.

    With ``graphs`` a bucket's runs carry ``gpu_graph_id`` = its index once its graph is
    ``captured`` (ONNX Runtime captures it during the first such run on a thread, then replays it);
    replay needs exactly these fixed buffers, which is why they exist. Other runs carry -1: no graph.

    The buffers come from ``pool`` (one set per tensor shape and bucket, shared by every network of
    a worker: a worker runs one batch at a time, and the buckets of one network hold about 650 MB
    for the 320-pixel SyncTalk_2D shapes). The loader thread verifies a new network with a private
    pool (the serving thread is using the shared one meanwhile), and :meth:`adopt` moves it to the
    shared pool when it is installed, before any graph is captured.
    """

    def __init__(self, session: ort.InferenceSession, graph: GraphInfo, sizes: tuple[int, ...],
                 device: str, device_id: int, graphs: bool, pool: dict | None = None) -> None:
        self.session = session
        self.graph = graph
        self.device, self.device_id = device, device_id
        self.graphs = graphs
        self.readback = "update_inplace"
        self.sets: dict[int, _BufferSet] = {}
        self.captured: set[int] = set()                 # buckets whose graph the serving thread replays
        self.no_graph = ort.RunOptions()
        self.no_graph.add_run_config_entry(GRAPH_ID, "-1")
        self._bind(sizes, {} if pool is None else pool)

    def _bind(self, sizes: tuple[int, ...], pool: dict) -> None:
        g = self.graph
        for k, b in enumerate(sizes):
            def buffer(role: str, shape: tuple[int, ...]) -> Any:
                key = (role, tuple(shape), b)               # an output never shares an input's buffer
                if key not in pool:
                    pool[key] = ort.OrtValue.ortvalue_from_shape_and_type([b, *shape], np.float32, self.device,
                                                                          self.device_id)
                return pool[key]
            image = buffer("image", g.image_shape)
            audio = buffer("audio", g.audio_shape)
            out = buffer("out", g.output_shape)
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(g.image_input, image)
            binding.bind_ortvalue_input(g.audio_input, audio)
            binding.bind_ortvalue_output(g.output, out)
            options = ort.RunOptions()
            if self.graphs:
                options.add_run_config_entry(GRAPH_ID, str(k))
            self.sets[b] = _BufferSet(image, audio, out, binding, options)

    def adopt(self, pool: dict) -> None:
        """Rebind every bucket to the worker's shared buffers (the private ones are freed)."""
        assert not self.captured, "a captured graph replays the buffers it was captured with"
        sizes = tuple(sorted(self.sets))
        self.sets = {}
        self._bind(sizes, pool)

    def run(self, image: np.ndarray, audio: np.ndarray, out: np.ndarray, graph: bool | None = None,
            weights: dict[str, Any] | None = None, token: int = 0) -> None:
        """One run at bucket ``len(image)``; ``graph``: use (or capture) its graph; None: if captured.
        ``weights`` (shared sessions): the network's weights, bound unless network ``token``'s already are."""
        b = len(image)
        s = self.sets[b]
        if weights is not None and s.bound != token:
            for name, value in weights.items():
                s.binding.bind_ortvalue_input(name, value)
            s.bound = token
        s.image.update_inplace(image)                 # ring -> device
        s.audio.update_inplace(audio)
        if graph is None:
            graph = b in self.captured
        self.session.run_with_iobinding(s.binding, s.options if graph and self.graphs else self.no_graph)
        self._read(s.out, out)                        # device -> ring

    def release(self, token: int) -> None:
        """Network ``token`` is gone: no binding keeps its weights (their memory) alive."""
        g = self.graph
        for s in self.sets.values():
            if s.bound == token:
                s.binding.clear_binding_inputs()
                s.binding.bind_ortvalue_input(g.image_input, s.image)
                s.binding.bind_ortvalue_input(g.audio_input, s.audio)
                s.bound = 0

    def _read(self, src: Any, out: np.ndarray) -> None:
        if self.readback == "update_inplace":
            try:
                # a CPU OrtValue over the ring's memory (no copy), filled by ONNX Runtime's own copy
                ort.OrtValue.ortvalue_from_numpy(out).update_inplace(src)
                return
            except (RuntimeError, ValueError, TypeError) as e:
                log.warning("device -> ring copy by OrtValue.update_inplace refused (%s); "
                            "using OrtValue.numpy() and one host copy", e)
                self.readback = "numpy"
        np.copyto(out, src.numpy())
