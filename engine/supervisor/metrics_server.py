"""The Prometheus endpoint, served by the supervisor at ``server.metrics`` (``http://HOST:PORT/metrics``).

One registry, read at every scrape, from three sources (why the supervisor: :mod:`engine.runtime.metrics`):

* the front's counters and histograms, from the multi-process files under ``<run_dir>/metrics``
  (``prometheus_client.multiprocess.MultiProcessCollector``);
* :class:`EngineCollector`: what the supervisor knows: readiness, process restarts by role,
  processes ready by role, shared memory by kind, and gauges from the front's last health
  snapshot (at most a second old): open streams, their largest lag, queued requests, connections,
  avatar memory;
* :class:`GpuCollector`: each GPU's utilisation and memory through NVML (``nvidia-ml-py``); on a
  machine without an NVIDIA driver there are simply no ``lse_gpu_*`` series.

The HTTP server is ``prometheus_client``'s own (a daemon thread of the supervisor); collecting only
reads the supervisor's state, never waits on a child.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from engine import __version__
from engine.runtime.shm import SHM_DIR, list_segments

log = logging.getLogger("engine.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
ROLES = ("front", "gpu", "compositor")
GPU_METRICS = ("lse_gpu_utilization_ratio", "lse_gpu_memory_used_bytes", "lse_gpu_memory_total_bytes")


def split_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` -> ("127.0.0.1", 9464); ``"[::1]:9464"`` -> ("::1", 9464)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def segment_kind(name: str, instance: str) -> str:
    rest = name[len(instance) + 1:]
    if rest.startswith("ring_"):
        return "ring"
    if rest.startswith("av_"):
        return "avatar"
    if rest == "hb":
        return "heartbeat"
    return "other"


class EngineCollector(Collector):
    """Gauges and counters the supervisor reads from its own state at scrape time."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        sup = self.sup
        info = GaugeMetricFamily("lse_build_info", "The engine's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("lse_ready", "1 when the front accepts requests", value=1 if sup.ready else 0)
        children = list(sup.children)
        restarts = CounterMetricFamily("lse_process_restarts", "Engine processes replaced, by role (when the front "
                                       "dies every process is replaced)", labels=["role"])
        ready = GaugeMetricFamily("lse_processes_ready", "Engine processes in state ready, by role", labels=["role"])
        for role in ROLES:
            restarts.add_metric([role], sum(c.restarts for c in children if c.role == role))
            ready.add_metric([role], sum(1 for c in children if c.role == role and c.state == "ready"))
        yield restarts
        yield ready
        yield from self._shared_memory()
        yield from self._front()

    def _shared_memory(self) -> Iterator[Metric]:
        inst = self.sup.cfg.server.instance
        size: dict[str, int] = {"ring": 0, "avatar": 0, "heartbeat": 0}
        resident: dict[str, int] = dict(size)
        for name in list_segments(f"{inst}_"):
            try:
                st = (SHM_DIR / name).stat()
            except OSError:
                continue                          # unlinked meanwhile
            kind = segment_kind(name, inst)
            size[kind] = size.get(kind, 0) + st.st_size
            resident[kind] = resident.get(kind, 0) + st.st_blocks * 512
        g = GaugeMetricFamily("lse_shared_memory_bytes", "Shared-memory segments' size, by kind (ring: the GPU "
                              "workers' batch rings; avatar: decoded backgrounds; heartbeat)", labels=["kind"])
        r = GaugeMetricFamily("lse_shared_memory_resident_bytes", "Shared-memory pages in RAM, by kind",
                              labels=["kind"])
        for kind in size:
            g.add_metric([kind], size[kind])
            r.add_metric([kind], resident[kind])
        yield g
        yield r

    def _front(self) -> Iterator[Metric]:
        st = self.sup.front_state or {}
        streams = st.get("streams", [])
        yield GaugeMetricFamily("lse_streams_open", "Streams open", value=len(streams))
        yield GaugeMetricFamily("lse_stream_lag_seconds", "The largest lag of an open stream (how late its next "
                                "owed frame is)", value=max((s.get("lag_ms", 0.0) for s in streams), default=0.0) / 1000)
        yield GaugeMetricFamily("lse_pending_requests", "Batch requests queued for a ring slot",
                                value=st.get("pending", 0))
        yield GaugeMetricFamily("lse_client_connections", "Client connections the front knows",
                                value=st.get("connections", 0))
        yield GaugeMetricFamily("lse_avatars_loaded", "Avatars whose backgrounds are in shared memory",
                                value=st.get("loaded_models", 0))
        bg = st.get("background_bytes", {})
        yield GaugeMetricFamily("lse_avatar_memory_bytes", "Shared memory held or reserved by avatars",
                                value=bg.get("used", 0))
        yield GaugeMetricFamily("lse_avatar_memory_budget_bytes", "capacity.background_bytes",
                                value=bg.get("budget", self.sup.cfg.capacity.background_bytes))
        yield from self._networks(st.get("gpu_workers", []))

    @staticmethod
    def _networks(workers: list[dict[str, Any]]) -> Iterator[Metric]:
        """Per GPU worker: its resident networks, their weight bytes and budget, its sessions, loads
        and evictions (``health``'s ``resident``)."""
        fams = {
            "networks": GaugeMetricFamily("lse_networks_resident", "Networks resident in a GPU worker",
                                          labels=["worker"]),
            "bytes": GaugeMetricFamily("lse_network_bytes", "Weight bytes of a GPU worker's resident networks",
                                       labels=["worker"]),
            "budget_bytes": GaugeMetricFamily("lse_network_budget_bytes", "capacity.network_bytes as a GPU "
                                              "worker resolved it", labels=["worker"]),
            "sessions": GaugeMetricFamily("lse_network_sessions", "ONNX Runtime sessions of a GPU worker's networks "
                                          "(one per shared architecture, one per network with its own)",
                                          labels=["worker"]),
            "loads": CounterMetricFamily("lse_network_loads", "Networks made resident by a GPU worker",
                                         labels=["worker"]),
            "evictions": CounterMetricFamily("lse_network_evictions", "Networks a GPU worker evicted (least "
                                             "recently used, for the byte budget or the own-session count)", labels=["worker"]),
        }
        for w in workers:
            r = w.get("resident")
            if not r:
                continue
            r = {**r, "sessions": r.get("own_sessions", 0) + len(w.get("architectures", {}))}
            for key, fam in fams.items():
                if r.get(key) is not None:
                    fam.add_metric([str(w.get("idx", 0))], r[key])
        yield from fams.values()


class GpuCollector(Collector):
    """Per-GPU utilisation and memory from NVML; nothing at all where NVML is missing."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.tried = False

    def _init(self) -> Any:
        if not self.tried:
            self.tried = True
            try:
                import pynvml
                pynvml.nvmlInit()
                self.nvml = pynvml
                log.info("NVML: %d GPU(s) for the metrics", pynvml.nvmlDeviceGetCount())
            except Exception as e:  # noqa: BLE001 - no library, no driver, no GPU: no GPU series
                log.debug("NVML not available (%s): no GPU metrics", e)
        return self.nvml

    def collect(self) -> Iterator[Metric]:
        nv = self._init()
        if nv is None:
            return
        util = GaugeMetricFamily(GPU_METRICS[0], "Fraction of the last sample period in which a "
                                 "kernel ran on the GPU (NVML)", labels=["gpu", "name"])
        used = GaugeMetricFamily(GPU_METRICS[1], "GPU memory in use (NVML)", labels=["gpu", "name"])
        total = GaugeMetricFamily(GPU_METRICS[2], "GPU memory (NVML)", labels=["gpu", "name"])
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError:
            return
        for i in range(count):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                used.add_metric([str(i), name], mem.used)
                total.add_metric([str(i), name], mem.total)
                util.add_metric([str(i), name], nv.nvmlDeviceGetUtilizationRates(h).gpu / 100)
            except nv.NVMLError:
                continue                          # one GPU that cannot say: skip its series
        yield util
        yield used
        yield total


class MetricsServer:
    """Started by the supervisor before it spawns anything (the children inherit the folder)."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup
        self.dir: Path = sup.cfg.run_path / "metrics"
        self.server: Any = None
        self.url = ""

    def start(self) -> None:
        address = self.sup.cfg.server.metrics
        shutil.rmtree(self.dir, ignore_errors=True)     # an earlier engine's counters are not ours
        self.dir.mkdir(parents=True)
        os.environ[ENV] = str(self.dir)
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=str(self.dir))
        registry.register(EngineCollector(self.sup))
        registry.register(GpuCollector())
        host, port = split_address(address)
        try:
            self.server, _ = start_http_server(port, host, registry)
        except OSError as e:
            raise OSError(f"server.metrics = {address!r}: cannot listen there: {e}") from None
        self.url = f"http://{address}/metrics"
        log.info("Prometheus metrics on %s", self.url)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        os.environ.pop(ENV, None)
        shutil.rmtree(self.dir, ignore_errors=True)
