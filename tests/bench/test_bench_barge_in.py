"""Barge-in latency: from a stream_flush request to the first idle frame received (target: within
two frame periods, 80 ms). Prints the figures; asserts nothing about time.

    tools/dev test tests/bench/test_bench_barge_in.py --benchmark-enable --benchmark-columns=min,median,max
"""
from __future__ import annotations

import time

from engine.audio.speech import speech_pcm
from engine.client import Client
from engine.testing.measure import Report, record

ROUNDS = 5


def test_flush_to_first_idle_frame(benchmark, shared_engine):
    samples, late = [], []
    with Client(shared_engine.endpoint, timeout=60) as c:
        for k in range(ROUNDS):
            s = c.open_stream("demo", realtime=True)
            s.push(speech_pcm(3.0, seed=k))
            got = []
            while len(got) < 10:
                got += s.poll(1.0)
            t0 = time.monotonic()
            n = s.flush()["next_frame"]
            first = None
            while first is None:
                first = next((f for f in s.poll(1.0) if f.number >= n), None)
            samples.append(time.monotonic() - t0)
            late.append(first.late_ms)
            assert first.idle
            s.close()
    r = record(benchmark, Report("flush to first idle frame", samples, extra={"late_ms": late}))
    print(f"\nflush -> first idle frame: median {r.p50 * 1000:.1f} ms, max {max(samples) * 1000:.1f} ms; "
          f"its late_ms {late}")
