"""Bounded memory wherever a client controls it (docs/protocol.md 9.4): clients that never read,
push an hour of audio, or pile up requests; the engine keeps serving everyone else."""
from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from engine.audio.speech import speech_pcm
from engine.client import Client, EngineError, StreamClosed

pytestmark = pytest.mark.integration
MB = 1 << 20


def front_uss(eng) -> int:
    return next(p["uss_bytes"] for p in eng.status()["processes"] if p["role"] == "front")


def raw_dealer(endpoint: str) -> zmq.Socket:
    """A client that reads nothing: tiny queues, so what it does not read stays in the engine."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def request(i: int, method: str, params: dict, buffers: list[tuple[str, np.ndarray]] = ()) -> list:
    from engine.protocol import encode_request
    return [b"", *encode_request(i, method, params, list(buffers))]


def test_a_client_that_never_reads_cannot_grow_the_front(engine_factory):
    eng = engine_factory(server="client_queue_bytes = 4194304\nmax_requests_per_client = 8\n")
    audio = np.random.default_rng(0).standard_normal((24, 32, 16, 16)).astype(np.float32)
    with Client(eng.endpoint, timeout=60) as c:
        c.composite("demo", audio)                               # avatar loaded, allocator warm
        base = front_uss(eng)
        sock = raw_dealer(eng.endpoint)
        try:
            for i in range(300):                                 # 300 x 24 frames: ~400 MB of replies
                sock.send_multipart(request(i, "composite", {"model": "demo", "batch_size": 24},
                                            [("audio_features", audio)]))
            for _ in range(40):
                t0 = time.monotonic()
                assert len(c.composite("demo", audio).frames) == 24      # others are served meanwhile
                assert time.monotonic() - t0 < 10
            grown = front_uss(eng) - base
            h = c.health()
        finally:
            sock.close(0)
    # bound: client_queue_bytes + max_requests_per_client replies (~1.3 MB each) + allocator slack
    print(f"front grew by {grown / MB:.1f} MB")
    assert grown < 60 * MB
    assert h["healthy"]


def test_a_client_that_never_reads_cannot_flood_the_log(shared_engine):
    """Every reply past its 1000-message send queue fails; the front says so in a handful of lines
    per 10 s (then one summary), not one line per request."""
    sock = raw_dealer(shared_engine.endpoint)
    try:
        for i in range(20_000):                                  # ~16,000 replies past the queue
            sock.send_multipart(request(i, "health", {}))
        with Client(shared_engine.endpoint) as c:                # served meanwhile, and all sent by now
            deadline = time.monotonic() + 30
            while shared_engine.log.read_text().count("does not read") < 5:
                assert c.health()["healthy"] and time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        sock.close(0)
    assert shared_engine.log.read_text().count("does not read") <= 6


def test_requests_per_connection_are_bounded(engine_factory):
    eng = engine_factory(server="max_requests_per_client = 4\n")
    audio = np.zeros((24, 32, 16, 16), np.float32)
    with Client(eng.endpoint, timeout=60) as c:
        ids = [c.submit("composite", {"model": "demo", "batch_size": 24}, [("audio_features", audio)])
               for _ in range(12)]
        replies = [c.receive(i) for i in ids]
        busy = [r for r in replies if not r.ok]
        assert 1 <= len(busy) <= 8 and all(r.error["code"] == "busy" for r in busy)
        assert "max_requests_per_client" in busy[0].error["message"]
        assert sum(r.ok for r in replies) >= 4
        with Client(eng.endpoint) as other:                      # per connection: others are not affected
            assert other.health()["healthy"]


def test_an_hour_of_audio_pushed_at_once_is_refused_not_kept(engine_factory):
    eng = engine_factory("[streams]\nmax_audio_ahead_s = 20\n")
    chunk = speech_pcm(30.0, seed=2)
    with Client(eng.endpoint, timeout=60) as c:
        s = c.open_stream("demo", realtime=True)
        base = front_uss(eng)
        codes = []
        t_worst = 0.0
        for _ in range(120):                                      # 120 x 30 s = one hour, as fast as possible
            t0 = time.monotonic()
            try:
                s.push(chunk[:16000 * 15], wait=False)
                codes.append("ok")
            except EngineError as e:
                codes.append(e.code)
            t_worst = max(t_worst, time.monotonic() - t0)
        row = next(r for r in c.health()["streams"] if r["stream"] == s.id)
        grown = front_uss(eng) - base
        with Client(eng.endpoint) as other:                      # and the engine serves others
            assert len(other.composite("demo", np.zeros((4, 32, 16, 16), np.float32)).frames) == 4
        s.close()
    print(f"front grew by {grown / MB:.1f} MB; slowest push {1000 * t_worst:.0f} ms")
    assert codes[0] == "ok" and codes.count("ok") <= 2 and set(codes[2:]) == {"busy"}
    assert row["audio_s"] <= 30.0
    assert grown < 30 * MB


def test_a_stream_whose_client_stops_reading_is_closed_with_slow_client(engine_factory):
    eng = engine_factory(server="client_queue_bytes = 1048576\nslow_client_timeout_s = 1\n")
    with Client(eng.endpoint, timeout=30, sockopts={zmq.RCVHWM: 1, zmq.RCVBUF: 4096}) as c:
        s = c.open_stream("demo", realtime=False)                 # frames as fast as they are made
        s.push(speech_pcm(20.0, seed=4), end=True)
        deadline = time.monotonic() + 20
        with Client(eng.endpoint) as watcher:                     # it does not read; the engine drops it
            while s.id in {r["stream"] for r in watcher.health()["streams"]}:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        got = []
        with pytest.raises(StreamClosed) as err:
            for f in s.frames(timeout=10):
                got.append(f.number)
        assert err.value.code == "slow_client"
        assert got == list(range(len(got))) and 0 < len(got) < 500


def test_stream_audio_never_stalls_the_front(engine_factory):
    """30 s pushes cost the front a copy, not the whole spectrogram at once: health stays prompt."""
    eng = engine_factory()
    chunk = speech_pcm(30.0, seed=6)
    with Client(eng.endpoint, timeout=60) as c, Client(eng.endpoint) as probe:
        streams = [c.open_stream("demo", realtime=True) for _ in range(3)]
        worst = 0.0
        for s in streams:
            c.submit("stream_audio", {"stream": s.id}, [("pcm", chunk)])
            t0 = time.monotonic()
            probe.health()
            worst = max(worst, time.monotonic() - t0)
        for s in streams:
            s.close()
    print(f"health during 30 s pushes: worst {1000 * worst:.0f} ms")
    assert worst < 1.0


@pytest.mark.parametrize("max_pending", [0, 2])
def test_a_full_queue_answers_busy_and_leaves_nothing_counted(engine_factory, max_pending):
    """busy at the queue's bound must not unbalance the avatar's count of work in flight (an
    avatar that looks busy forever can never be unloaded; one that looks idle while busy could be);
    with max_pending = 0 a request that can start at once is still served."""
    eng = engine_factory(f"[capacity]\nmax_pending = {max_pending}\n")
    audio = np.zeros((24, 32, 16, 16), np.float32)
    with Client(eng.endpoint, timeout=60) as c:
        assert len(c.composite("demo", audio).frames) == 24
        ids = [c.submit("composite", {"model": "demo", "batch_size": 24}, [("audio_features", audio)])
               for _ in range(20)]
        replies = [c.receive(i) for i in ids]
        assert any(r.ok for r in replies) and any(not r.ok and r.error["code"] == "busy" for r in replies)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert c.unload("demo")["unloaded"] is True      # nothing counted as in flight any more
                break
            except EngineError as e:
                assert e.code == "busy" and time.monotonic() < deadline, e
                time.sleep(0.1)
        assert len(c.composite("demo", audio).frames) == 24      # and it loads and serves again
