"""Inference core: ONNX Runtime sessions for one device, no sockets (used by the GPU worker).

A network is run only at the batch sizes of its bucket policy (``engine/worker/buckets.py``), every one
warmed up at load, before the network serves anything; a Run at a size not run before is a
*cold run*, counted and reported (``stats()``), since on a GPU it costs seconds of set-up.

Loading is split in two so that it can happen off the serving path: :meth:`InferenceCore.prepare`
(session, fp16 conversion, warm-up at every size, self-check; touches no shared state, so a
loader thread runs it while the worker keeps serving) and :meth:`InferenceCore.install` (the
worker's own thread: the model joins the LRU set). ONNX Runtime releases the GIL while it
creates a session and during ``Run`` (measured: a thread creating a session that takes 3 s leaves
the interpreter free throughout; destroying it holds it briefly), so the loader does not hold up
serving.

How a piece of a batch runs (per network; ``stats()`` says which):

``run``             ``session.run`` with numpy arrays (``gpu.io_binding = false``)
``bind_ring``       IO binding of the ring's memory: the CPU provider reads and writes the ring in
                    place; on CUDA, ONNX Runtime copies host -> device and device -> host
``device_buffers``  per bucket, input and output OrtValues allocated once on the device and bound
                    once; ``OrtValue.update_inplace`` copies the ring's rows in, the output is
                    copied out into the ring (``gpu.device_buffers``, default on CUDA)
``cuda_graphs``     device buffers plus one CUDA graph per bucket (``enable_cuda_graph``, run option
                    ``gpu_graph_id`` = the bucket's index): a replay launches the whole network at once

Device buffers and graphs are used only where they prove themselves: each bucket's output through
them must equal a plain run's on two different inputs (which also catches a replay that reads
stale inputs); a bucket that fails, or a graph ONNX Runtime refuses, falls back (to ``bind_ring``,
or to its device buffers without a graph) with the reason logged and reported.

What cannot happen in the loader thread. ONNX Runtime's CUDA provider keeps its cuBLAS/cuDNN
handles and its CUDA graphs per thread (``PerThreadContext``), and a graph capture (global capture
mode) forbids other threads' synchronous CUDA calls while it runs. So after :meth:`install` the
serving thread finishes a network itself, one short step at a time and only while it is idle
(:meth:`finish_step`, called by the worker between jobs): one run at the smallest size (the thread's
handles), then, with CUDA graphs, one capture and check per bucket, under :attr:`lock`, which the
loader holds while it prepares, so a capture never overlaps a load. Until a bucket's graph is
captured, its runs use the same device buffers without a graph (``gpu_graph_id = -1``): warm, and
correct.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engine.avatars.disk import AvatarError, GraphInfo, read_encoder, session_graph
from engine.worker.buckets import encoder_buckets, network_buckets, plan, rows_needed
from engine.worker.budget import auto_budget, victims
from engine.worker.device_buffers import GRAPH_ID, DeviceBuffers
from engine.worker.loaded import EncoderSession, InferenceError, LoadedModel
from engine.worker.shared import SharedSessions
from engine.worker.weights import NotShareable
from engine.worker.weights import prepare as split_network

log = logging.getLogger("engine.inference")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class InferenceCore:
    """The networks of one device, least recently used first out when more than ``capacity`` have
    their own session or their weights exceed ``network_bytes`` (None: no byte budget)."""

    def __init__(self, device: int | None, capacity: int = 8, intra_op_threads: int = 0,
                 io_binding: bool = True, buckets: str | tuple[int, ...] = "auto", max_batch: int = 50,
                 device_buffers: bool | str = "auto", cuda_graphs: bool = False,
                 cache_dir: Path | None = None, shared_sessions: bool = False,
                 network_bytes: int | None = None) -> None:
        self.device = device
        self.capacity = capacity
        self.network_bytes = network_bytes
        self.sharing = shared_sessions and io_binding
        self.shared = SharedSessions(self)
        self.loads = self.evictions = 0
        self.intra_op_threads = intra_op_threads
        self.io_binding = io_binding
        self.buckets = buckets
        self.max_batch = max_batch
        self.device_buffers = io_binding and (device is not None if device_buffers == "auto" else bool(device_buffers))
        self.cuda_graphs = cuda_graphs
        self.cache_dir = cache_dir or Path(".run") / "cache"
        self.models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.on_progress: Callable[[], None] = lambda: None     # the worker's heartbeat during long loads
        self.encoders: dict[str, EncoderSession] = {}
        self.cold_runs = 0
        self.cold_shapes: deque[str] = deque(maxlen=20)
        # held by the loader while it prepares and by the serving thread while it captures a graph
        # (a capture must not overlap another thread's CUDA calls); see finish_step
        self.lock = threading.Lock()
        self.buffer_pool: dict = {}          # device buffers shared by the installed networks (DeviceBuffers)
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
            # heuristic algorithm choice: the exhaustive cuDNN search costs hundreds of ms per shape
            self.providers = [(CUDA, {"device_id": device, "cudnn_conv_algo_search": "HEURISTIC"}), CPU]
        self.provider = CPU if device is None else CUDA
        if device is not None:
            self._probe()

    @classmethod
    def from_config(cls, device: int | None, cfg) -> InferenceCore:
        g = cfg.gpu
        budget = cfg.capacity.network_bytes
        return cls(device, cfg.capacity.models_per_device, g.intra_op_threads, g.io_binding, g.batch_buckets,
                   cfg.ring.max_batch, g.device_buffers, g.cuda_graphs, cfg.cache_dir, g.shared(device is not None),
                   auto_budget(device, g.slots(device is not None)) if budget == "auto" else budget)

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

    # -- loading ---------------------------------------------------------------------------------
    def sizes_for(self, graph: GraphInfo) -> tuple[int, ...] | None:
        return network_buckets(self.buckets, self.device is not None, self.max_batch, graph.fixed_batch)

    @property
    def bucketed(self) -> bool:
        """Whether this core pads to fixed sizes (then the audio encoder is bucketed too)."""
        return network_buckets(self.buckets, self.device is not None, self.max_batch) is not None

    def load(self, name: str, path: Path, precision: str = "fp32", encoder: str | None = None) -> LoadedModel:
        """Prepare and install at once (start-up preloads and tests; the worker uses both halves)."""
        m = self.models.get(name)
        if m is not None and m.path == path and m.precision == precision:
            self.models.move_to_end(name)
            return m
        m = self.prepare(name, path, precision, encoder, progress=self.on_progress)
        self.install(m)
        while m.todo and self.finish_step():         # this thread serves it: finish it here, now
            pass
        return m

    def prepare(self, name: str, path: Path, precision: str = "fp32", encoder: str | None = None,
                progress: Callable[[], None] | None = None) -> LoadedModel:
        """Everything a load does before the network may serve: fp16 conversion, session, warm-up
        at every size of its bucket policy, the device path's self-check, its audio encoder.
        Thread-safe: it reads this core's settings and changes nothing shared."""
        with self.lock:
            return self._prepare(name, path, precision, encoder, progress or (lambda: None))

    def _prepare(self, name: str, path: Path, precision: str, encoder: str | None,
                 progress: Callable[[], None]) -> LoadedModel:
        t0 = time.perf_counter()
        file = path
        if precision == "fp16":
            from engine.worker import precision as fp16
            try:
                file = fp16.fp16_model(path, self.cache_dir)
            except Exception as e:  # noqa: BLE001 - onnx / the converter raise many kinds
                raise InferenceError(f"{path}: fp16 conversion failed: {e}") from None
        if self.sharing:
            try:
                m = self.shared.prepare(name, path, precision, file, split_network(file, self.cache_dir), progress)
            except NotShareable as e:
                log.info("%s: its own session (%s)", name, e)
            else:
                return self._finish_prepare(m, encoder, progress, t0)
        sess, graphs, why = self._session(file)
        try:
            graph = session_graph(sess, path)       # not read_graph: no protobuf parse under the GIL
        except AvatarError as e:
            raise InferenceError(str(e)) from None
        m = LoadedModel(name, path, sess, graph, time.time(), precision=precision, file=file,
                        sizes=self.sizes_for(graph), weight_bytes=file.stat().st_size)
        if why:
            m.fallback.append(why)
        if graphs:                                  # runs outside the device buffers never capture
            m.run_options = ort.RunOptions()
            m.run_options.add_run_config_entry(GRAPH_ID, "-1")
        m.mode = "run" if not self.io_binding else "bind_ring"
        if self.device_buffers and m.sizes:
            try:
                m.buffers = DeviceBuffers(sess, graph, m.sizes, "cpu" if self.device is None else "cuda",
                                          self.device or 0, graphs)
                m.mode = "cuda_graphs" if graphs else "device_buffers"
            except Exception as e:  # noqa: BLE001
                m.fallback.append(f"device buffers could not be allocated: {e}")
                log.warning("%s: device buffers could not be allocated (%s); binding the ring instead", name, e)
        elif self.device_buffers:
            m.fallback.append("device buffers need fixed batch sizes (gpu.batch_buckets is off)")
        self.warm_up(m, progress)
        return self._finish_prepare(m, encoder, progress, t0)

    def _finish_prepare(self, m: LoadedModel, encoder: str | None, progress: Callable[[], None],
                        t0: float) -> LoadedModel:
        if encoder:
            m.encoder = self.prepare_encoder(encoder, progress)
        if m.precision == "fp16":
            m.fp16_error = self.shared.fp16_error(m, lambda: self._fp16_error(m, encoder))
        m.load_ms = 1000 * (time.perf_counter() - t0)
        log.info("prepared network %s (%s, %s, sizes %s%s) on %s in %.0f ms", m.name, m.precision, m.mode,
                 list(m.sizes) if m.sizes else "exact", f", architecture {m.arch.key[:12]}" if m.arch else "",
                 self.provider, m.load_ms)
        return m

    def install(self, m: LoadedModel, busy: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Make a prepared network serve (the worker's thread); returns the names it evicted: least
        recently used first, never one in ``busy`` (networks with work in flight)."""
        old = self.models.pop(m.name, None)
        if old is not None and old is not m:
            self.shared.release(old)
        evicted = self._make_room(m, busy)
        self.models[m.name] = m
        self.loads += 1
        if m.arch is not None:
            if m.buffers is not None and not m.arch.adopted:
                m.buffers.adopt(self.buffer_pool)
                m.arch.adopted = True
        elif m.buffers is not None:
            m.buffers.adopt(self.buffer_pool)
        m.todo = [] if m.arch is not None and m.arch.touched else [("touch", (m.sizes or (1,))[0], 0)]
        if m.buffers is not None and m.buffers.graphs:
            for b in m.sizes or ():
                if m.bucket_modes.get(b) is None:
                    m.todo += [("ref", b, 0), ("ref", b, 1), *[("capture", b, 0)] * 3, ("check", b, 1), ("check", b, 0)]
        if m.encoder is not None and m.encoder.path not in self.encoders:
            self.encoders[m.encoder.path] = m.encoder
        return evicted

    def resident_bytes(self) -> int:
        return sum(m.weight_bytes for m in self.models.values())

    def _make_room(self, m: LoadedModel, busy: set[str] | frozenset[str]) -> list[str]:
        evicted = []
        for victim in victims(self.models, m, self.capacity, self.network_bytes, busy):
            self.shared.release(self.models.pop(victim))
            self.evictions += 1
            evicted.append(victim)
            log.info("unloaded network %s (least recently used)", victim)
        return evicted

    # -- finishing on the serving thread ---------------------------------------------------------
    def has_todo(self) -> bool:
        return any(m.todo for m in self.models.values())

    def finish_step(self) -> bool:
        """One step (one run) of finishing an installed network on the calling (serving) thread:
        its first run on this thread; with CUDA graphs, per bucket two runs without the graph
        (references), three with it (ONNX Runtime's regular runs and the capture) and two replays
        checked against the references. False when there is nothing to do or the loader is busy."""
        m = next((m for m in self.models.values() if m.todo), None)
        if m is None or not self.lock.acquire(blocking=False):
            return False
        try:
            kind, b, k = m.todo.pop(0)
            g = m.graph
            image = np.full((b, *g.image_shape), (0.25, 0.75)[k], np.float32)      # cheap, and two distinct inputs
            audio = np.random.default_rng(2 * b + k).standard_normal((b, *g.audio_shape)).astype(np.float32)
            out = np.empty((b, *g.output_shape), np.float32)
            if kind == "touch":                    # this thread's first run: its cuBLAS/cuDNN handles
                self._piece(m, image, audio, out)
                if m.arch is not None:
                    m.arch.touched = True
                if m.encoder is not None:
                    n = m.encoder.sizes[0] if m.encoder.sizes else 1
                    m.encoder.run(np.zeros((n, *m.encoder.input_shape()), np.float32))
                return True
            try:
                if kind == "ref":
                    m.buffers.run(image, audio, out, graph=False)
                    m.refs[(b, k)] = out
                elif kind == "capture":            # by the third run ONNX Runtime has captured the graph
                    m.buffers.run(image, audio, out, graph=True)
                else:
                    m.buffers.run(image, audio, out, graph=True)
                    ref = m.refs.pop((b, k))
                    worst = float(np.max(np.abs(out - ref) / (1.0 + np.abs(ref))))
                    if worst > 1e-3:
                        raise InferenceError(f"a replay differs from the run without the graph by {worst:.3g}")
                    if not any(key[0] == b for key in m.refs):
                        m.buffers.captured.add(b)
                        log.info("%s: CUDA graph for batch %d captured and checked", m.name, b)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types (capture refused, ...)
                reason = f"batch {b}: CUDA graph not used ({e}); device buffers without a graph"
                log.warning("%s: %s", m.name, reason)
                m.fallback.append(reason)
                m.bucket_modes[b] = "device_buffers"
                m.todo = [t for t in m.todo if t[1] != b or t[0] == "touch"]
                m.refs = {key: v for key, v in m.refs.items() if key[0] != b}
            return True
        finally:
            self.lock.release()

    def session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle intra-op threads must not spin: the compositors need those cores between batches
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def _session(self, file: Path) -> tuple[ort.InferenceSession, bool, str]:
        """(session, CUDA graphs on, why graphs are off when they were asked for)."""
        why = ""
        if self.cuda_graphs and self.device_buffers and self.device is not None:
            providers = [(CUDA, {**self.providers[0][1], "enable_cuda_graph": "1"}), CPU]
            try:
                sess = ort.InferenceSession(str(file), self.session_options(), providers=providers)
                if sess.get_providers()[0] == CUDA:
                    return sess, True, ""
                why = f"CUDA graphs: session runs on {sess.get_providers()[0]}"
            except Exception as e:  # noqa: BLE001 - e.g. nodes ONNX Runtime places on the CPU
                why = f"CUDA graphs refused by onnxruntime: {e}"
            log.warning("%s: %s; running without CUDA graphs", file, why)
        elif self.cuda_graphs:
            why = ("CUDA graphs need the CUDA provider" if self.device is None
                   else "CUDA graphs need device buffers (gpu.device_buffers, gpu.batch_buckets)")
            log.warning("%s: %s; running without them", file, why)
        try:
            sess = ort.InferenceSession(str(file), self.session_options(), providers=self.providers)
        except Exception as e:  # noqa: BLE001
            raise InferenceError(f"{file}: onnxruntime cannot load it: {e}") from None
        actual = sess.get_providers()[0]
        if actual != self.provider:
            raise InferenceError(f"{file}: session runs on {actual}, not {self.provider}")
        return sess, False, why

    def warm_up(self, m: LoadedModel, progress: Callable[[], None]) -> None:
        """Run every size before the network serves: the first runs pick kernels, allocate and
        (with graphs) capture; with device buffers each size is also checked against a plain run."""
        sizes = m.sizes or (1,)
        for b in sizes:
            if m.buffers is not None:
                self._verify(m, b, progress)
            else:
                image = np.zeros((b, *m.graph.image_shape), np.float32)
                audio = np.zeros((b, *m.graph.audio_shape), np.float32)
                out = np.empty((b, *m.graph.output_shape), np.float32)
                for _ in range(2):
                    self._piece(m, image, audio, out)
                    progress()
            m.shapes.add(b)
        m.runs = 0

    def _verify(self, m: LoadedModel, b: int, progress: Callable[[], None]) -> None:
        """Warm bucket ``b`` up through the device buffers (without a graph: graphs are captured by
        the serving thread) and check them against plain runs on two different inputs; a bucket
        that fails falls back to binding the ring."""
        g = m.graph
        rng = np.random.default_rng(b)
        inputs = [(rng.random((b, *g.image_shape), np.float32),
                   rng.standard_normal((b, *g.audio_shape)).astype(np.float32)) for _ in range(2)]
        skip = ort.RunOptions()
        skip.add_run_config_entry(GRAPH_ID, "-1")     # plain runs never take part in a capture
        try:
            refs = [m.session.run([g.output], {**(m.host or {}), g.image_input: i, g.audio_input: a}, skip)[0]
                    for i, a in inputs]
            out = np.empty((b, *g.output_shape), np.float32)
            for _ in range(2):
                m.buffers.run(*inputs[0], out, graph=False, weights=m.weights, token=m.token)
                progress()
            worst = 0.0
            for (image, audio), ref in zip(inputs[::-1], refs[::-1]):
                m.buffers.run(image, audio, out, graph=False, weights=m.weights, token=m.token)
                worst = max(worst, float(np.max(np.abs(out - ref) / (1.0 + np.abs(ref)))))
            if worst > 1e-3:
                raise InferenceError(f"output differs from a plain run by {worst:.3g}")
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types (capture refused, ...)
            reason = f"batch {b}: {m.mode} failed its check ({e}); binding the ring"
            log.warning("%s: %s", m.name, reason)
            m.fallback.append(reason)
            m.bucket_modes[b] = "bind_ring"
            image, audio = inputs[0]
            out = np.empty((b, *g.output_shape), np.float32)
            for _ in range(2):
                self._piece(m, image, audio, out)

    def prepare_encoder(self, path: str, progress: Callable[[], None] | None = None) -> EncoderSession:
        """An audio encoder session, warmed up at each window count it will run at."""
        try:
            read_encoder(Path(path))                # the contract, in engine-ctl avatar check's words
        except AvatarError as e:
            raise InferenceError(str(e)) from None
        try:
            sess = ort.InferenceSession(path, self.session_options(), providers=self.providers)
        except Exception as e:  # noqa: BLE001
            raise InferenceError(f"{path}: onnxruntime cannot load the audio encoder: {e}") from None
        enc = EncoderSession(path, sess, encoder_buckets(self.bucketed, self.max_batch))
        for n in enc.sizes or ():
            enc.run(np.zeros((n, *enc.input_shape()), np.float32))
            enc.shapes.add(n)
            (progress or (lambda: None))()
        return enc

    def load_encoder(self, path: str) -> EncoderSession:
        enc = self.encoders.get(path)
        if enc is None:
            enc = self.encoders[path] = self.prepare_encoder(path, self.on_progress)
        return enc

    def _fp16_error(self, m: LoadedModel, encoder: str | None) -> dict[str, Any] | None:
        from engine.worker import precision as fp16
        try:
            return fp16.error_report(m.path, self.cache_dir, m.path.parent.parent, Path(encoder) if encoder else None,
                                     self.providers, self.provider, graph=m.graph)
        except Exception as e:  # noqa: BLE001 - the report must not stop a network that runs
            log.warning("%s: fp16 error could not be measured: %s", m.name, e)
            return {"error": str(e)}

    def unload(self, name: str) -> bool:
        m = self.models.pop(name, None)
        if m is not None:
            self.shared.release(m)
        return m is not None

    # -- running ---------------------------------------------------------------------------------
    def rows(self, model: LoadedModel, n: int) -> int:
        """Rows of the ring the worker should hand :meth:`run` for ``n`` frames (``n`` plus the
        last piece's padding, as far as a ring slot holds; more padding runs from scratch rows)."""
        return min(rows_needed(n, model.sizes), max(n, self.max_batch))

    def run(self, model: LoadedModel, image: np.ndarray, audio: np.ndarray, out: np.ndarray,
            n: int | None = None) -> None:
        """Run the first ``n`` rows (default: all) at the model's sizes; ``out`` (in the ring)
        receives their output. Rows past ``n`` in the arrays are padding, overwritten freely."""
        n = len(image) if n is None else n
        avail = min(len(image), len(audio), len(out))
        for start, size in plan(n, model.sizes):
            end = start + size
            if end <= avail:
                self._piece(model, image[start:end], audio[start:end], out[start:end])
            else:                                   # padding past the caller's rows: scratch rows
                k = n - start
                sc = model.scratch.get(size)
                if sc is None:
                    g = model.graph
                    sc = model.scratch[size] = tuple(np.zeros((size, *s), np.float32) for s in
                                                     (g.image_shape, g.audio_shape, g.output_shape))
                sc[0][:k], sc[1][:k] = image[start:n], audio[start:n]
                self._piece(model, *sc)
                out[start:n] = sc[2][:k]
            self._count(model.name, model.shapes, size, model.sizes is not None)
            model.runs += 1

    def _piece(self, m: LoadedModel, image: np.ndarray, audio: np.ndarray, out: np.ndarray) -> None:
        b = len(image)
        mode = m.bucket_modes.get(b, m.mode)
        if mode in ("device_buffers", "cuda_graphs") and m.buffers is not None and b in m.buffers.sets:
            m.buffers.run(image, audio, out, weights=m.weights, token=m.token)   # its graph once captured
            return
        g = m.graph
        options = m.run_options
        if self.io_binding:
            binding = m.binding if m.binding is not None else m.session.io_binding()
            for name, arr in ((g.image_input, image), (g.audio_input, audio)):
                binding.bind_input(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
            binding.bind_output(g.output, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            m.session.run_with_iobinding(binding, options)
        else:
            np.copyto(out, m.session.run([g.output], {g.image_input: image, g.audio_input: audio}, options)[0])

    def _count(self, key: str, shapes: set[int], size: int, bucketed: bool) -> None:
        """A run after warm-up: a size not run before is a cold run."""
        if size in shapes:
            return
        shapes.add(size)
        self.cold_runs += 1
        self.cold_shapes.append(f"{key}:{size}")
        (log.warning if bucketed else log.debug)("cold run: %s at size %d (not warmed up)", key, size)

    def encode_audio(self, path: str, windows: np.ndarray) -> np.ndarray:
        """The audio encoder ([N,1,80,16] mel windows -> [N,D] features) at its window-count buckets
        (padded with silence rows whose output is dropped; exact counts when not bucketed)."""
        enc = self.load_encoder(path)
        return enc.encode(windows, lambda size: self._count(f"encoder:{path}", enc.shapes, size, enc.sizes is not None))

    # -- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What ``health`` shows for this worker: the sizes each network and encoder has run at,
        cold runs since warm-up, and each network's precision and execution path."""
        shapes = {name: sorted(m.shapes) for name, m in self.models.items()}
        shapes.update({f"encoder:{p}": sorted(e.shapes) for p, e in self.encoders.items()})
        return {"cold_runs": self.cold_runs, "cold_shapes": list(self.cold_shapes), "shapes": shapes,
                "networks": {name: m.describe() for name, m in self.models.items()},
                "resident": {"networks": len(self.models), "bytes": self.resident_bytes(),
                             "budget_bytes": self.network_bytes, "own_sessions": sum(m.arch is None for m in self.models.values()),
                             "shared_sessions": self.sharing, "sessions_built": self.shared.built,
                             "loads": self.loads, "evictions": self.evictions},
                "architectures": self.shared.describe(list(self.models.values()))}

