"""What a latency suite measures, reported through pytest-benchmark (so ``--benchmark-json``,
``--benchmark-compare`` and ``--benchmark-compare-fail`` work as usual) with percentiles in the
benchmark's ``extra_info`` (``p50``, ``p95``, ``p99``, in seconds like pytest-benchmark's own
figures) and returned as a :class:`Report`.

- :func:`composite_round_trip`: one ``composite`` of ``batch_size`` frames, request sent to reply
  read, per round;
- :func:`stream_latency`: N real-time streams speaking at once; the samples are every frame's
  audio-to-frame latency (the chunk holding the frame's last sample sent -> the frame received),
  with the first frame's and the steady state's apart, the rate and the look-ahead floor;
- :func:`stream_throughput`: frames per second each of N concurrent streams keeps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Report:
    name: str
    samples: list[float]                        # seconds
    unit: str = "s"
    extra: dict[str, Any] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples, q)) if self.samples else float("nan")

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p95(self) -> float:
        return self.percentile(95)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    def info(self) -> dict[str, Any]:
        return {"p50": round(self.p50, 6), "p95": round(self.p95, 6), "p99": round(self.p99, 6),
                "samples": len(self.samples), **self.extra}


def record(benchmark: Any, report: Report) -> Report:
    """Hand ``report``'s samples to pytest-benchmark as its rounds (one iteration each) and its
    percentiles as ``extra_info``. With ``--benchmark-disable`` only the report is returned."""
    if benchmark is None:
        return report
    benchmark.extra_info.update(report.info())
    if getattr(benchmark, "disabled", False):
        return report
    if not hasattr(benchmark, "_make_stats") or getattr(benchmark, "_mode", None):
        raise RuntimeError("this pytest-benchmark fixture cannot take measured samples (used already, or a "
                           "pytest-benchmark without _make_stats: pytest-benchmark 4 or 5 is needed)")
    benchmark._mode = "lipsync-engine samples"
    stats = benchmark._make_stats(1)
    for s in report.samples:
        stats.update(s)
    return report


def composite_round_trip(client: Any, avatar: str, batch_size: int = 12, rounds: int = 20, warmup: int = 2,
                         benchmark: Any = None) -> Report:
    """``rounds`` composites of ``batch_size`` frames of speech-like audio features, one at a time."""
    from engine.audio.speech import speech_like_features
    audio = speech_like_features(batch_size, 0)
    for i in range(warmup):
        client.composite(avatar, audio, start_frame=i * batch_size)
    samples, frames = [], 0
    for i in range(rounds):
        t0 = time.perf_counter()
        r = client.composite(avatar, audio, start_frame=i * batch_size)
        samples.append(time.perf_counter() - t0)
        frames += len(r.frames)
    report = Report(f"composite x{batch_size}", samples,
                    extra={"batch_size": batch_size, "frames": frames,
                           "frames_per_second": round(frames / sum(samples), 2)})
    return record(benchmark, report)


def _streams(engine: Any, avatar: str, streams: int, seconds: float, processes: int):
    from engine.cli.bench import run_stream_bench
    res = run_stream_bench(engine.endpoint, avatar, streams, seconds, keys=engine.keys, processes=processes)
    if res.errors:
        raise AssertionError(f"{len(res.errors)} stream error(s): {res.errors[:3]}")
    return res


def stream_latency(engine: Any, avatar: str, streams: int = 1, seconds: float = 6.0, processes: int = 1,
                   benchmark: Any = None) -> Report:
    """Audio-to-frame latency of every frame of ``streams`` real-time streams speaking ``seconds``."""
    res = _streams(engine, avatar, streams, seconds, processes)
    s = res.summary()
    lat = [x / 1000 for x in res.latencies_ms]           # grouped by stream, in res.frames' order
    starts = np.cumsum([0, *res.frames[:-1]]).astype(int).tolist()
    first = [lat[i] for i in starts if i < len(lat)]
    steady = [x for i, x in enumerate(lat) if i not in set(starts)]
    report = Report(f"stream latency x{streams}", lat, extra={
        "streams": streams, "first_frame_latency_s": round(max(first), 4) if first else None,
        "steady_p50": round(float(np.percentile(steady, 50)), 4) if steady else None,
        "steady_p99": round(float(np.percentile(steady, 99)), 4) if steady else None,
        "lookahead_floor_s": round(res.floor_ms / 1000, 4), "min_rate_fps": s["min_rate_fps"],
        "frames": s["frames"]})
    return record(benchmark, report)


def stream_throughput(engine: Any, avatar: str, streams: int = 4, seconds: float = 6.0, processes: int = 1,
                      benchmark: Any = None) -> Report:
    """Frames per second of each of ``streams`` concurrent real-time streams (samples: seconds per
    frame of each stream, so that lower is better as pytest-benchmark assumes)."""
    res = _streams(engine, avatar, streams, seconds, processes)
    rates = [r for r in res.rates if r > 0]
    report = Report(f"streams x{streams}", [1.0 / r for r in rates], extra={
        "streams": streams, "rates_fps": [round(r, 2) for r in res.rates],
        "min_rate_fps": round(min(rates), 2) if rates else 0.0, "frames": sum(res.frames)})
    return record(benchmark, report)
