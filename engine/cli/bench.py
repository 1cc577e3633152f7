"""Benchmarks: the seed's test client against a running engine, and the bare in-process loop.

``run_bench`` sends composite batches from K client threads (each its own connection) and
reports per-batch inference / composite / total ms, averages and frames/s. ``bare_loop`` does
the same work in one process with no engine around it (cut the input, one Run, paste, encode),
the yardstick the engine's throughput is compared with.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.audio.speech import speech_like_features
from engine.client import Client
from engine.runtime.keys import ClientKeys


@dataclass
class BenchResult:
    clients: int
    batch_size: int
    batches: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return sum(b["batch_size"] for b in self.batches)

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s else 0.0

    def mean(self, key: str) -> float:
        vals = [b[key] for b in self.batches if key in b]
        return float(np.mean(vals)) if vals else 0.0

    def summary(self) -> dict[str, Any]:
        sizes = [b.get("jpeg_bytes", 0) / b["batch_size"] for b in self.batches]
        return {"clients": self.clients, "batch_size": self.batch_size, "batches": len(self.batches),
                "frames": self.frames, "wall_s": round(self.wall_s, 3), "fps": round(self.fps, 2),
                "per_client_fps": round(self.fps / max(1, self.clients), 2),
                "inference_ms": round(self.mean("inference_time_ms"), 1),
                "composite_ms": round(self.mean("composite_time_ms"), 1),
                "total_ms": round(self.mean("total_time_ms"), 1),
                "jpeg_kb": round(float(np.mean(sizes)) / 1024, 1) if sizes else 0.0,
                "errors": len(self.errors)}


def run_bench(endpoint: str, model: str, batches: int = 5, batch_size: int = 24, clients: int = 1,
              save: Path | None = None, warmup: int = 2, audio_shape: tuple[int, ...] = (32, 16, 16),
              on_batch: Callable[[int, dict[str, Any]], None] | None = None, timeout: float = 300.0,
              keys: ClientKeys | None = None) -> BenchResult:
    """K clients, each sending ``warmup`` + ``batches`` composite batches one after the other."""
    result = BenchResult(clients, batch_size)
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)

    def worker(k: int) -> None:
        with Client(endpoint, timeout=timeout, keys=keys) as c:
            start = k * 1000
            try:
                for w in range(warmup):
                    c.composite(model, speech_like_features(batch_size, start, audio_shape), start_frame=start)
            except Exception as e:  # noqa: BLE001
                with lock:
                    result.errors.append(f"client {k} warm-up: {e}")
            barrier.wait()
            for i in range(batches):
                frame0 = start + i * batch_size
                try:
                    r = c.composite(model, speech_like_features(batch_size, frame0, audio_shape), start_frame=frame0)
                except Exception as e:  # noqa: BLE001
                    with lock:
                        result.errors.append(f"client {k} batch {i}: {e}")
                    continue
                info = dict(r.info, client=k, frame_sizes=[len(f) for f in r.frames])
                if save is not None and k == 0:
                    for j, jpeg in enumerate(r.frames):
                        (save / f"frame_{frame0 + j:05d}.jpg").write_bytes(jpeg)
                with lock:
                    result.batches.append(info)
                if on_batch is not None:
                    on_batch(i, info)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - t0
    return result


def engine_cpu_seconds(roles: dict[int, str]) -> dict[str, float]:
    """User + system CPU seconds used so far by the engine's processes (``{pid: role}``, from
    ``engine-ctl status``), summed per role."""
    import psutil
    total: dict[str, float] = {}
    for pid, role in roles.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total[role] = total.get(role, 0.0) + t.user + t.system
    return total


class BareLoop:
    """The engine's work in one process, no engine around it: cut input, one Run, paste, encode,
    with the same ``encoder`` as the engine (``splice``: the avatar's spliced form, its crops cut
    from the face regions; ``full``: decoded frames, whole-frame JPEGs)."""

    def __init__(self, models_dir: Path, model: str, batch_size: int = 24, paste: str = "synctalk",
                 quality: int = 75, subsampling: str = "420", threads: int = 0, encoder: str = "splice") -> None:
        import onnxruntime as ort

        from engine.avatars.disk import avatar_files, read_graph
        from engine.avatars.frames import AvatarView
        from engine.avatars.spliced import SplicedAvatarView
        from engine.kernels.image import FrameCompositor
        from engine.kernels.splice import FrameCodec, Settings, SpliceCompositor

        files = avatar_files(models_dir, model)
        self.graph = read_graph(files.onnx)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(files.onnx), opts, providers=["CPUExecutionProvider"])
        seg = f"lsebare_{os.getpid()}_{model}"
        self.encoder = encoder
        if encoder == "splice":
            settings = Settings(quality, subsampling)
            self.view = SplicedAvatarView.create(seg, files, self.graph.face, settings)
            self.splicer = SpliceCompositor(FrameCodec(self.view.height, self.view.width, settings))
        else:
            self.view = AvatarView.create(seg, files, self.graph.face)
            self.enc = FrameCompositor(quality, subsampling)
        self.paste = paste
        self.batch_size = batch_size
        self.image = np.empty((batch_size, *self.graph.image_shape), np.float32)

    def batch(self, i: int) -> list[bytes]:
        from engine.kernels.image import fill_visual, frame_index
        g, v, b = self.graph, self.view, self.batch_size
        idx = np.asarray(frame_index(np.arange(i * b, (i + 1) * b), v.n), np.int64)
        crops, local = v.crops_for(idx)
        fill_visual(crops, self.image, local)
        audio = speech_like_features(b, i * b, g.audio_shape)
        out = self.sess.run([g.output], {g.image_input: self.image, g.audio_input: audio})[0]
        if self.encoder == "splice":
            return [self.splicer(v.parts(int(k), border=self.paste == "synctalk"), out[j], self.paste)
                    for j, k in enumerate(idx)]
        return [self.enc(v.frames[k], out[j], tuple(v.rects[k]), v.crops[k] if self.paste == "synctalk" else None,
                         self.paste) for j, k in enumerate(idx)]

    def close(self) -> None:
        self.view.close()


def bare_loop(models_dir: Path, model: str, batches: int = 5, batch_size: int = 24, paste: str = "synctalk",
              quality: int = 75, subsampling: str = "420", threads: int = 0, warmup: int = 2,
              encoder: str = "splice") -> dict[str, Any]:
    """Frames/s of :class:`BareLoop` over ``batches`` batches after ``warmup``."""
    loop = BareLoop(models_dir, model, batch_size, paste, quality, subsampling, threads, encoder)
    try:
        for i in range(warmup):
            loop.batch(i)
        t0 = time.perf_counter()
        for i in range(batches):
            loop.batch(warmup + i)
        total = time.perf_counter() - t0
    finally:
        loop.close()
    return {"batches": batches, "batch_size": batch_size, "frames": batches * batch_size,
            "wall_s": round(total, 3), "fps": round(batches * batch_size / total, 2),
            "batch_ms": round(1000 * total / batches, 1), "encoder": encoder}


@dataclass
class StreamBenchResult:
    streams: int
    seconds: float
    frames: list[int] = field(default_factory=list)           # per stream
    rates: list[float] = field(default_factory=list)          # frames/s per stream (first to last frame)
    first_frame_ms: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)   # audio-to-frame, every frame of every stream
    arrivals: list[float] = field(default_factory=list)       # when each of those frames arrived (time.monotonic())
    late_ms: list[float] = field(default_factory=list)        # the engine's own lateness report
    errors: list[str] = field(default_factory=list)
    floor_ms: float = 0.0                                     # the engine's look-ahead (stream_open's lookahead_ms)

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms or [0.0])
        late = np.array(self.late_ms or [0.0])
        return {"streams": self.streams, "seconds": self.seconds, "frames": sum(self.frames),
                "min_rate_fps": round(min(self.rates), 2) if self.rates else 0.0,
                "mean_rate_fps": round(float(np.mean(self.rates)), 2) if self.rates else 0.0,
                "first_frame_ms_max": round(max(self.first_frame_ms), 1) if self.first_frame_ms else None,
                "latency_p50_ms": round(float(np.percentile(lat, 50)), 1),
                "latency_p99_ms": round(float(np.percentile(lat, 99)), 1),
                "late_p99_ms": round(float(np.percentile(late, 99)), 1), "late_max_ms": round(float(late.max()), 1),
                "floor_ms": self.floor_ms, "errors": len(self.errors)}


def run_stream_bench(endpoint: str, model: str, streams: int = 3, seconds: float = 6.0, chunk_ms: int = 40,
                     timeout: float = 60.0, keys: ClientKeys | None = None, processes: int = 1) -> StreamBenchResult:
    """N clients each speak ``seconds`` of speech-like audio in real time and read the frames.

    Audio-to-frame latency of frame k: from the moment the chunk holding frame k's last sample was
    sent to the moment frame k arrived. Its floor is the look-ahead (frame k+7's mel window).
    ``processes`` > 1 spreads the client threads over that many processes (many streams in one
    Python process would measure the client's interpreter, not the engine); they start speaking
    at the same moment.
    """
    processes = max(1, min(processes, streams))
    if processes == 1:
        return _stream_clients(endpoint, model, 0, streams, seconds, chunk_ms, timeout, None, keys)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    counts = [len(part) for part in np.array_split(np.arange(streams), processes)]
    start_at = time.time() + 5.0 + 0.05 * streams          # every process up and every stream open by then
    result = StreamBenchResult(streams, seconds)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_stream_clients, endpoint, model, sum(counts[:k]), n, seconds, chunk_ms, timeout,
                               start_at, keys) for k, n in enumerate(counts)]
        for f in futures:
            part = f.result()
            for name in ("frames", "rates", "first_frame_ms", "latencies_ms", "arrivals", "late_ms", "errors"):
                getattr(result, name).extend(getattr(part, name))
            result.floor_ms = max(result.floor_ms, part.floor_ms)
    return result


def _stream_clients(endpoint: str, model: str, first: int, streams: int, seconds: float, chunk_ms: int,
                    timeout: float, start_at: float | None, keys: ClientKeys | None = None) -> StreamBenchResult:
    """Streams ``first .. first + streams - 1``, one thread each; they open, wait for each other
    (and for the wall-clock ``start_at`` when given), then speak."""
    from engine.audio.speech import speech_pcm
    result = StreamBenchResult(streams, seconds)
    lock = threading.Lock()
    barrier = threading.Barrier(streams)
    chunk = 16 * chunk_ms

    def worker(n: int) -> None:
        pcm = speech_pcm(seconds, seed=3 + n)
        sent_at: list[float] = []
        try:
            with Client(endpoint, timeout=timeout, keys=keys) as c:
                try:
                    s = c.open_stream(model, realtime=True)
                except BaseException:
                    barrier.abort()                      # the others must not wait for this one
                    raise
                result.floor_ms = float(s.info.get("lookahead_ms", 0))
                barrier.wait(timeout)
                if start_at is not None:
                    time.sleep(max(0.0, start_at - time.time()))
                t_open = time.monotonic()
                got: list[tuple[float, Any]] = []
                t_start = time.monotonic()
                for i, off in enumerate(range(0, len(pcm), chunk)):
                    s.push(pcm[off:off + chunk])
                    now = time.monotonic()
                    sent_at.extend([now] * len(pcm[off:off + chunk]))
                    # until the next chunk is due, take each frame as it arrives (stamped on arrival,
                    # not at the next 40 ms push, which would add up to 40 ms to the latency)
                    next_push = t_start + (i + 1) * chunk / 16000
                    while True:
                        for f in s.poll(max(0.0, next_push - time.monotonic())):
                            got.append((time.monotonic(), f))
                        if time.monotonic() >= next_push:
                            break
                s.end()
                for f in s.frames(timeout):
                    got.append((time.monotonic(), f))
                s.close()
        except Exception as e:  # noqa: BLE001
            with lock:
                result.errors.append(f"stream {n}: {e!r}")
            return
        numbers = [f.number for _, f in got]
        lats = []
        for t, f in got:
            last_sample = min(len(sent_at) - 1, (f.number + 1) * 640 - 1)
            lats.append(1000 * (t - sent_at[last_sample]))
        span = got[-1][0] - got[0][0] if len(got) > 1 else 0.0
        with lock:
            if numbers != list(range(len(numbers))):
                result.errors.append(f"stream {n}: frames out of order")
            result.frames.append(len(got))
            result.rates.append((len(got) - 1) / span if span else 0.0)
            result.first_frame_ms.append(1000 * (got[0][0] - t_open) if got else float("nan"))
            result.latencies_ms.extend(lats)
            result.arrivals.extend(t for t, _ in got)
            result.late_ms.extend(f.late_ms for _, f in got)

    threads = [threading.Thread(target=worker, args=(first + n,), daemon=True) for n in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


# -- stream capacity ---------------------------------------------------------------------------------
CAPACITY_RATE = 24.5              # frames/s every stream must keep
CAPACITY_SLACK_MS = 150.0         # p99 audio-to-frame latency allowed above the floor (the look-ahead)


def stream_verdict(summary: dict[str, Any], rate: float = CAPACITY_RATE, slack_ms: float = CAPACITY_SLACK_MS) -> str:
    """"" when a stream benchmark meets the real-time bar, else why not."""
    if summary["errors"]:
        return f"{summary['errors']} stream(s) failed"
    if summary["min_rate_fps"] < rate:
        return f"slowest stream {summary['min_rate_fps']} < {rate} frames/s"
    if summary["latency_p99_ms"] > summary["floor_ms"] + slack_ms:
        return f"p99 latency {summary['latency_p99_ms']} ms > floor {summary['floor_ms']:.0f} + {slack_ms:.0f} ms"
    return ""


def search_capacity(measure: Callable[[int], dict[str, Any]], limit: int, start: int = 1,
                    rate: float = CAPACITY_RATE, slack_ms: float = CAPACITY_SLACK_MS,
                    on_row: Callable[[dict[str, Any]], None] | None = None) -> tuple[int, list[dict[str, Any]]]:
    """The largest stream count in 1..``limit`` that meets the bar (:func:`stream_verdict`):
    doubling from ``start`` until a count fails, then bisecting between the last pass and the
    first failure (below ``start`` when ``start`` fails). ``measure(n)`` runs n streams and returns
    their summary. Returns the count (0 when not even one stream meets the bar) and every row
    measured, by count, each with ``ok`` and ``why``; the count's neighbour above (the first
    failure) is among them unless the count is ``limit``. One run per count: near the boundary a
    noisy machine can move the answer by a stream or two, so compare runs made in one session."""
    rows: dict[int, dict[str, Any]] = {}

    def ok(n: int) -> bool:
        if n not in rows:
            row = dict(measure(n))
            row["why"] = stream_verdict(row, rate, slack_ms)
            row["ok"] = not row["why"]
            rows[n] = row
            if on_row is not None:
                on_row(row)
        return rows[n]["ok"]

    lo, n = 0, max(1, min(start, limit))
    while n <= limit and ok(n):
        lo, n = n, n * 2
    hi = min(n, limit + 1)                              # the first count known to fail (or past the limit)
    if lo == 0 and n > 1:                               # even ``start`` failed: look below it
        hi, lo = n, 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, [rows[k] for k in sorted(rows)]
