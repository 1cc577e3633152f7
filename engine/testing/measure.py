"""What a latency suite measures, reported through pytest-benchmark (so ``--benchmark-json``,
``--benchmark-compare`` and ``--benchmark-compare-fail`` work as usual) with percentiles in the
benchmark's ``extra_info`` (``p50``, ``p95``, ``p99``, in seconds like pytest-benchmark's own
figures) and returned as a :class:`Report`.

- :func:`composite_round_trip`: one ``composite`` of ``batch_size`` frames, request sent to reply
  read, per round;
- :func:`stream_latency`: N real-time streams speaking at once; the samples are every frame's
  audio-to-frame latency (the chunk holding the frame's last sample sent -> the frame received),
  with the percentiles of the streams' first frames and of the steady state (every other frame)
  apart, the rate and the look-ahead floor;
- :func:`stream_throughput`: the frame rate N concurrent streams keep; the samples are the
  intervals between each stream's consecutive frames (seconds per frame).
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
        return {**percentiles(self.samples), "samples": len(self.samples), **self.extra}


def percentiles(samples: list[float], prefix: str = "", digits: int = 6) -> dict[str, float | None]:
    """``{prefix}p50``, ``{prefix}p95``, ``{prefix}p99`` of ``samples`` (None for none)."""
    return {f"{prefix}p{q}": round(float(np.percentile(samples, q)), digits) if len(samples) else None
            for q in (50, 95, 99)}


def _per_stream(values: list[float], counts: list[int]) -> list[list[float]]:
    """``values`` (every frame of every stream, stream after stream) cut into the streams'."""
    ends = np.cumsum(counts).tolist()
    return [values[e - n:e] for e, n in zip(ends, counts)]


def record(benchmark: Any, report: Report) -> Report:
    """Hand ``report``'s samples to pytest-benchmark as its rounds (one iteration each) and its
    percentiles as ``extra_info``. With ``--benchmark-disable`` only the report is returned.

    pytest-benchmark has no public way to hand it times measured elsewhere (it times a call
    itself; ionelmc/pytest-benchmark#52 asks for one), so this does what that issue's workaround
    does with the fixture's ``_make_stats`` and ``_mode`` (pytest-benchmark 4 and 5);
    tests/testing/test_plugin.py checks the rounds, the saved runs and ``--benchmark-compare-fail``
    on the installed version."""
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
    lat = [x / 1000 for x in res.latencies_ms]           # grouped by stream, in res.frames' order
    per_stream = [x for x in _per_stream(lat, res.frames) if x]
    first = [x[0] for x in per_stream]
    steady = [y for x in per_stream for y in x[1:]]
    report = Report(f"stream latency x{streams}", lat, extra={
        "streams": streams, **percentiles(first, "first_frame_", 4),
        "first_frame_max": round(max(first), 4) if first else None, **percentiles(steady, "steady_", 4),
        "lookahead_floor_s": round(res.floor_ms / 1000, 4), "min_rate_fps": res.summary()["min_rate_fps"],
        "frames": sum(res.frames)})
    return record(benchmark, report)


def stream_throughput(engine: Any, avatar: str, streams: int = 4, seconds: float = 6.0, processes: int = 1,
                      benchmark: Any = None) -> Report:
    """The frame rate of ``streams`` concurrent real-time streams. The samples are the intervals
    between each stream's consecutive frames (seconds per frame, so that lower is better as
    pytest-benchmark assumes): one stream's mean interval is the inverse of its rate, the p95 and
    p99 show the stalls."""
    res = _streams(engine, avatar, streams, seconds, processes)
    intervals = [float(d) for x in _per_stream(res.arrivals, res.frames) for d in np.diff(x)]
    rates = [r for r in res.rates if r > 0]
    report = Report(f"streams x{streams}", intervals, extra={
        "streams": streams, "rates_fps": [round(r, 2) for r in res.rates],
        "min_rate_fps": round(min(rates), 2) if rates else 0.0, "frames": sum(res.frames)})
    return record(benchmark, report)
