"""End-to-end batch latency through a real engine beside the bare in-process loop
(same network, batch and machine: cut input, one Run, paste, encode).

    tools/dev test tests/bench --benchmark-enable --benchmark-columns=min,median,max,ops

Throughput comparisons with several clients and the bench avatar: ``engine-ctl bench --bare``.
"""
from __future__ import annotations

import pytest

from engine.audio.speech import speech_like_features
from engine.cli.bench import BareLoop
from engine.client import Client

pytestmark = pytest.mark.benchmark(group="batch-of-12-demo")
BATCH = 12


def test_engine_batch(benchmark, shared_engine):
    audio = speech_like_features(BATCH, 0)
    with Client(shared_engine.endpoint) as c:
        for _ in range(2):
            c.composite("demo", audio)
        r = benchmark(c.composite, "demo", audio)
    assert len(r.frames) == BATCH


def test_bare_loop_batch(benchmark, models_root):
    loop = BareLoop(models_root, "demo", BATCH)
    try:
        for i in range(2):
            loop.batch(i)
        frames = benchmark(loop.batch, 0)
    finally:
        loop.close()
    assert len(frames) == BATCH
