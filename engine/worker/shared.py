"""Shared sessions (``gpu.shared_sessions``): one ONNX Runtime session per network architecture in a
worker, each network's weights bound as inputs per run (the split: ``engine/worker/weights.py``).

The first network of an architecture builds the session and warms it up at every batch size, as a
network with its own session does; every later one only reads its prepared weights file and puts
the tensors on the session's device (CUDA), or wraps them where they lie (CPU provider): no session
build, no warm-up, since the architecture's shapes are warm whatever the weights. Each network
keeps an IO binding with its weights bound once (the ``bind_ring`` path); with device buffers, a
bucket's binding is rebound to a network's weights when the previous run was another network's.

CUDA graphs are not used with shared sessions: a graph replays the device addresses it was captured
with, weights included.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort

from engine.avatars.disk import AvatarError, graph_info
from engine.worker.device_buffers import DeviceBuffers
from engine.worker.loaded import ArchSession, InferenceError, LoadedModel
from engine.worker.precision import cached_report
from engine.worker.weights import Split, read_weights

log = logging.getLogger("engine.inference")

_tokens = itertools.count(1)
NO_GRAPHS = "CUDA graphs are not used with shared sessions (a graph replays the weights it was captured with)"


class SharedSessions:
    """The architectures of one :class:`~engine.worker.inference.InferenceCore` and their sessions."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.archs: dict[str, ArchSession] = {}
        self.built = 0                          # sessions built (one per architecture)

    def prepare(self, name: str, path: Path, precision: str, file: Path, split: Split,
                progress: Callable[[], None]) -> LoadedModel:
        """A network of ``split``'s architecture, resident (loader thread, under the core's lock)."""
        core = self.core
        host = read_weights(split)                  # NotShareable: the caller gives it its own session
        where = "cpu" if core.device is None else "cuda"
        weights = {k: ort.OrtValue.ortvalue_from_numpy(v, where, core.device or 0) for k, v in host.items()}
        arch = self.archs.get(split.arch)
        new = arch is None
        if arch is None:
            arch = self._build(split, name, set(host))
        m = LoadedModel(name, path, arch.session, arch.graph, time.time(), precision=precision, file=file,
                        sizes=arch.sizes, shapes=arch.shapes, mode=arch.mode, bucket_modes=arch.bucket_modes,
                        buffers=arch.buffers, fallback=arch.fallback, weight_bytes=split.weight_bytes,
                        arch=arch, weights=weights, host=host, token=next(_tokens))
        m.binding = arch.session.io_binding()
        for k, v in weights.items():
            m.binding.bind_ortvalue_input(k, v)
        if new:
            core.warm_up(m, progress)
            if arch.buffers is not None:            # the checks bound m's weights: hold nothing of it
                arch.buffers.release(m.token)
            self.archs[split.arch] = arch           # warm: later networks of it just bind their weights
        if core.device is not None:
            m.host = None                           # on the device now; the host copy goes
        return m

    def fp16_error(self, m: LoadedModel, measure: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        """The first network of an architecture measures it (two sessions, once); the others report
        the cached figure of their own weights when there is one."""
        if m.arch is None or m.arch.first == m.name:
            return measure()
        cached = cached_report(m.path, self.core.cache_dir, self.core.provider)
        return cached if cached is not None else {
            "not_measured": f"shared session: measured when an architecture's first network loads ({m.arch.first})"}

    def _build(self, split: Split, first: str, weight_names: set[str]) -> ArchSession:
        core = self.core
        t0 = time.perf_counter()
        try:
            sess = ort.InferenceSession(str(split.graph_file), core.session_options(), providers=core.providers)
        except Exception as e:  # noqa: BLE001
            raise InferenceError(f"{split.graph_file}: onnxruntime cannot load the shared architecture: {e}") from None
        if sess.get_providers()[0] != core.provider:
            raise InferenceError(f"{split.graph_file}: session runs on {sess.get_providers()[0]}, not {core.provider}")

        def dims(arg: Any) -> list[int | None]:
            return [d if isinstance(d, int) else None for d in arg.shape]
        try:
            graph = graph_info(split.graph_file, {i.name: dims(i) for i in sess.get_inputs() if i.name not in weight_names},
                               [(o.name, dims(o)) for o in sess.get_outputs()])
        except AvatarError as e:
            raise InferenceError(str(e)) from None
        arch = ArchSession(split.arch, split.graph_file, sess, graph, core.sizes_for(graph), first=first)
        if core.cuda_graphs:
            arch.fallback.append(NO_GRAPHS)
        if core.device_buffers and arch.sizes:
            try:
                arch.buffers = DeviceBuffers(sess, graph, arch.sizes, "cpu" if core.device is None else "cuda",
                                             core.device or 0, False)
                arch.mode = "device_buffers"
            except Exception as e:  # noqa: BLE001
                arch.fallback.append(f"device buffers could not be allocated: {e}")
        elif core.device_buffers:
            arch.fallback.append("device buffers need fixed batch sizes (gpu.batch_buckets is off)")
        self.built += 1
        arch.build_ms = 1000 * (time.perf_counter() - t0)
        log.info("built the shared session of architecture %s (%d weights) on %s in %.0f ms", split.arch[:12],
                 len(weight_names), core.provider, arch.build_ms)
        return arch

    def release(self, m: LoadedModel) -> None:
        """``m`` is evicted or unloaded: no binding of its architecture keeps its weights alive."""
        if m.arch is not None and m.arch.buffers is not None:
            m.arch.buffers.release(m.token)

    def describe(self, models: list[LoadedModel]) -> dict[str, Any]:
        counts: dict[str, list[int]] = {}
        for m in models:
            if m.arch is not None:
                c = counts.setdefault(m.arch.key, [0, 0])
                c[0] += 1
                c[1] += m.weight_bytes
        return {key[:16]: a.describe(*counts.get(key, [0, 0])) for key, a in list(self.archs.items())}
