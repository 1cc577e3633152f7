"""Batch clients and live streams sharing one engine (the scheduling policy of docs/protocol.md 9.2)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.audio.speech import speech_pcm
from engine.client import Client

pytestmark = pytest.mark.integration


@pytest.mark.realtime
def test_live_streams_keep_their_rate_while_batch_clients_saturate_the_rings(engine_factory):
    eng = engine_factory()
    stop = threading.Event()
    done: dict[int, list[float]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def batch_client(k: int) -> None:
        """Keeps three composites of 24 frames in flight for as long as the streams run."""
        try:
            with Client(eng.endpoint, timeout=60) as c:
                audio = np.random.default_rng(k).standard_normal((24, 32, 16, 16)).astype(np.float32)
                flying = {}
                while not stop.is_set() or flying:
                    while not stop.is_set() and len(flying) < 3:
                        flying[c.submit("composite", {"model": "demo", "batch_size": 24},
                                        [("audio_features", audio)])] = time.monotonic()
                    reply = c.receive()
                    assert reply.ok, reply.error
                    done[k].append(time.monotonic() - flying.pop(reply.id))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    streams: dict[int, list] = {}

    def speaker(n: int) -> None:
        try:
            pcm = speech_pcm(6.0, seed=40 + n)
            with Client(eng.endpoint, timeout=60) as c:
                s = c.open_stream("demo", realtime=True)
                for i in range(0, len(pcm), 3200):               # 200 ms pushes, in real time
                    s.push(pcm[i:i + 3200])
                    streams.setdefault(n, []).extend((time.monotonic(), f) for f in s.poll(0.0))
                    time.sleep(0.2)
                s.end()
                streams[n].extend((time.monotonic(), f) for f in s.frames(timeout=30))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    batchers = [threading.Thread(target=batch_client, args=(k,)) for k in range(2)]
    for t in batchers:
        t.start()
    with Client(eng.endpoint) as c:                            # the rings are saturated before the streams start
        deadline = time.monotonic() + 30                        # (the avatar's first load comes first)
        while not ((h := c.health())["pending"] > 0 or all(w["free_slots"] == 0 for w in h["gpu_workers"])):
            assert time.monotonic() < deadline and not errors, (h, errors)
            time.sleep(0.05)
    speakers = [threading.Thread(target=speaker, args=(n,)) for n in range(3)]
    for t in speakers:
        t.start()
    for t in speakers:
        t.join(90)
    before = [len(d) for d in done.values()]
    stop.set()
    for t in batchers:
        t.join(60)
    assert not errors, errors
    for n, got in streams.items():
        frames = [f for _, f in got]
        assert [f.number for f in frames] == list(range(150)), n
        late = sorted(f.late_ms for f in frames)
        span = got[-1][0] - got[0][0]
        print(f"stream {n}: {149 / span:.2f} frames/s, late p50 {late[75]} p99 {late[148]} max {late[-1]} ms")
        # the documented bound (docs/protocol.md 9.2): at least 90% of 25 frames/s, the typical frame
        # on time to a fraction of a second, on a shared 2-core machine whose cores this test's own
        # clients and the engine's four processes already oversubscribe
        assert 149 / span >= 22.5
        assert late[75] < 250
    for k, times in done.items():
        print(f"batch client {k}: {len(times)} composites, max {max(times):.2f} s")
    assert min(before) >= 20                                    # batch requests kept completing meanwhile
    assert max(max(t) for t in done.values()) < 10
