"""engine/cli/bench.py: the stream-capacity search (a pure function of the measurements)."""
from __future__ import annotations

import pytest

from engine.cli.bench import search_capacity, stream_verdict


def fake(capacity: int, floor: float = 490.0):
    """A measurement where up to ``capacity`` streams keep 25 frames/s near the floor."""
    tried: list[int] = []

    def measure(n: int) -> dict:
        tried.append(n)
        over = n > capacity
        return {"streams": n, "errors": 0, "min_rate_fps": 21.0 if over and n % 2 else 25.0,
                "latency_p99_ms": floor + (400 if over else 60), "floor_ms": floor}
    return measure, tried


@pytest.mark.parametrize("capacity", [0, 1, 2, 3, 5, 17, 37, 63, 64, 200])
def test_search_finds_the_boundary_and_measures_its_neighbours(capacity):
    measure, tried = fake(capacity)
    best, rows = search_capacity(measure, limit=64)
    assert best == min(capacity, 64)
    assert len(tried) == len(set(tried)) <= 13                  # each count once; doubling + bisection
    by_n = {r["streams"]: r for r in rows}
    assert [r["streams"] for r in rows] == sorted(by_n)
    if best:
        assert by_n[best]["ok"]
    if best < 64:
        assert not by_n[best + 1]["ok"] and by_n[best + 1]["why"]


def test_a_failing_start_is_searched_below():
    measure, tried = fake(10)
    assert search_capacity(measure, limit=64, start=16)[0] == 10 and tried[0] == 16


def test_verdict_names_what_missed_the_bar():
    row = {"errors": 0, "min_rate_fps": 25.0, "latency_p99_ms": 600.0, "floor_ms": 490.0}
    assert stream_verdict(row) == ""
    assert "24.3 < 24.5" in stream_verdict({**row, "min_rate_fps": 24.3})
    assert "p99 latency 700.0 ms > floor 490 + 150 ms" == stream_verdict({**row, "latency_p99_ms": 700.0})
    assert "2 stream(s) failed" == stream_verdict({**row, "errors": 2})
