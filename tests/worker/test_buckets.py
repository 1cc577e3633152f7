"""engine/worker/buckets.py: which batch sizes a network and an encoder run at, and how a batch is cut."""
from __future__ import annotations

import pytest

from engine.worker.buckets import AUTO_BUCKETS, encoder_buckets, network_buckets, plan, rows_needed


def test_auto_is_buckets_on_a_gpu_and_exact_sizes_on_the_cpu():
    assert network_buckets("auto", gpu=True, max_batch=50) == AUTO_BUCKETS
    assert network_buckets("auto", gpu=True, max_batch=30) == (1, 2, 4, 8, 16, 24, 30)   # the ring's largest
    assert network_buckets("auto", gpu=False, max_batch=50) is None
    assert network_buckets("off", gpu=True, max_batch=50) is None
    assert network_buckets((1, 4, 16), gpu=False, max_batch=50) == (1, 4, 16)            # any provider
    assert network_buckets((1, 4, 16), gpu=True, max_batch=8) == (1, 4)
    assert network_buckets("off", gpu=True, max_batch=50, fixed_batch=4) == (4,)          # the graph decides


@pytest.mark.parametrize("sizes", [AUTO_BUCKETS, (1, 2, 4, 8), (4,), (3, 7), None])
def test_plan_covers_every_row_once_at_allowed_sizes(sizes):
    for n in range(1, 120):
        pieces = plan(n, sizes)
        assert pieces[0][0] == 0
        for (s0, b0), (s1, _) in zip(pieces, pieces[1:]):
            assert s1 == s0 + b0                                 # contiguous, no overlap
        start, size = pieces[-1]
        assert start < n <= start + size                         # covers n; only the last piece pads
        if sizes is None:
            assert pieces == [(0, n)]
        else:
            assert all(b in sizes for _, b in pieces)
            assert all(b == sizes[-1] for _, b in pieces[:-1])   # full pieces first
            assert size == min(b for b in sizes if b >= n - start)   # the smallest that holds the rest
        assert rows_needed(n, sizes) == start + size


def test_plan_examples():
    assert plan(13, (1, 2, 4, 8)) == [(0, 8), (8, 8)]
    assert plan(41, AUTO_BUCKETS) == [(0, 50)]
    assert plan(0, AUTO_BUCKETS) == []


def test_encoder_buckets_hold_the_largest_job():
    sizes = encoder_buckets(True, max_batch=50)
    assert sizes == (16, 32, 64, 128, 256, 512, 1024)          # 50 one-frame segments: 50 x 16 = 800 windows
    assert encoder_buckets(True, max_batch=1) == (16,)
    assert encoder_buckets(False, max_batch=50) is None
