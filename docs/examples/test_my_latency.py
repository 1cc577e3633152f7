"""An example latency suite for your own engine: copy it into your project and set your budgets.

    pip install "lipsync-engine[pytest]"          # the engine, with pytest and pytest-benchmark
    pytest test_my_latency.py --benchmark-json=latency.json               # starts the demo avatar's engine
    pytest test_my_latency.py --lse-config engine.toml --lse-avatar alice # your config and avatar
    pytest test_my_latency.py --lse-endpoint tcp://gpu-box:5555 \\
        --lse-server-key keys/server.key --lse-client-key keys/me.key_secret   # an engine that runs already

Each test hands its samples to pytest-benchmark (so --benchmark-compare and
--benchmark-compare-fail=median:10% work as usual) and the percentiles to its extra_info.
The budgets below are read from the environment so that one file serves every machine.
"""
import os

import pytest

COMPOSITE_P99_S = float(os.environ.get("LSE_COMPOSITE_P99_S", "2.0"))   # per batch of 12, request to reply
STREAM_SLACK_S = float(os.environ.get("LSE_STREAM_SLACK_S", "0.15"))    # p99 above the look-ahead floor
MIN_RATE_FPS = float(os.environ.get("LSE_MIN_RATE_FPS", "24.5"))


@pytest.mark.parametrize("batch_size", [1, 12])
def test_composite_round_trip(lse_measure, lse_avatar, batch_size):
    r = lse_measure.composite(lse_avatar, batch_size=batch_size, rounds=10)
    print(f"composite x{batch_size}: p50 {r.p50 * 1000:.0f} ms, p99 {r.p99 * 1000:.0f} ms, "
          f"{r.extra['frames_per_second']} frames/s")
    assert r.p99 <= COMPOSITE_P99_S * batch_size / 12 + 0.1


def test_one_live_stream(lse_measure, lse_avatar):
    r = lse_measure.stream_latency(lse_avatar, streams=1, seconds=4)
    floor = r.extra["lookahead_floor_s"]
    print(f"audio-to-frame p50 {r.p50 * 1000:.0f} ms, p99 {r.p99 * 1000:.0f} ms (floor {floor * 1000:.0f} ms), "
          f"first frame {r.extra['first_frame_p50'] * 1000:.0f} ms, {r.extra['min_rate_fps']} frames/s")
    assert r.extra["min_rate_fps"] >= MIN_RATE_FPS
    assert r.extra["steady_p99"] <= floor + STREAM_SLACK_S


def test_two_streams_keep_their_rate(lse_measure, lse_avatar):
    r = lse_measure.stream_throughput(lse_avatar, streams=2, seconds=4)
    print(f"2 streams: {r.extra['rates_fps']} frames/s, frame interval p50 {r.p50 * 1000:.0f} ms, "
          f"p99 {r.p99 * 1000:.0f} ms")
    assert r.extra["min_rate_fps"] >= MIN_RATE_FPS
