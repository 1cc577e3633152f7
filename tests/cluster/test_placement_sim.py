"""tools/placement_sim.py in its quick form (the issue's cluster, fewer requests): the qualitative
results a user relies on when choosing the router's policy, and a deterministic run per seed."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import placement_sim  # noqa: E402

ZIPF = (0.8, 1.0, 1.2)
NETS = ("bounded", "unbounded")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "sim.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "placement_sim.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    result["stdout"] = r.stdout
    result["by"] = {(x["policy"], x["networks"], x["zipf"]): x for x in result["rows"]}
    return result


def test_runs_the_issues_cluster_and_prints_the_table(quick):
    p = quick["params"]
    assert (p["avatars"], p["hosts"], p["gpus"], p["shm_gb"], p["slots"]) == (11_000, 8, 4, 64.0, 32)
    assert tuple(p["zipf"]) == ZIPF and p["stream_share"] == 0.25 and p["stream_s"] == 120.0
    assert len(quick["rows"]) == len(placement_sim.POLICIES) * len(NETS) * len(ZIPF)
    out = quick["stdout"]
    assert "| policy | networks | s=0.8: hits | % of bound | busiest/mean |" in out
    for label in ("| affinity | 32/GPU |", "| multiplex | unbounded |", "| static bound | unbounded |"):
        assert label in out
    # busy but not saturated: a few busy units per GPU of the 8 a GPU is taken to serve
    assert all(2.0 < r["mean_load_per_gpu"] < 6.0 for r in quick["rows"])


def test_affinity_beats_random_and_round_robin_by_a_wide_margin(quick):
    by = quick["by"]
    for net in NETS:
        for s in ZIPF:
            aff = by["affinity", net, s]["hit"]
            for blind in ("random", "round-robin"):
                other = by[blind, net, s]["hit"]
                assert aff >= other + 0.10, (net, s, blind, aff, other)
                assert 1 - aff <= 0.8 * (1 - other), (net, s, blind, aff, other)   # misses cut by >= 20%


def test_unbounded_networks_hit_at_least_as_often(quick):
    by = quick["by"]
    for s in ZIPF:
        assert by["affinity", "unbounded", s]["hit"] >= by["affinity", "bounded", s]["hit"] + 0.05, s


def test_affinity_loads_hosts_evenly_and_no_worse_than_the_multiplex_model(quick):
    by = quick["by"]
    for net in NETS:
        for s in ZIPF:
            aff, mux = by["affinity", net, s]["imbalance"], by["multiplex", net, s]["imbalance"]
            assert aff <= 1.1 and aff <= mux, (net, s, aff, mux)


def test_no_policy_beats_the_static_bound_and_affinity_comes_close(quick):
    for r in quick["rows"]:
        assert r["hit"] <= r["bound"] + 0.01, r
    for net in NETS:
        bounds = [quick["bounds"][f"{net}/{s}"] for s in ZIPF]
        assert bounds == sorted(bounds)                 # more skew, more of the requests fit
    # the issue's target is 95% at s = 1.0 (the full form: docs/performance.md); the quick form is within
    # about a point of it
    assert quick["by"]["affinity", "unbounded", 1.0]["of_bound"] >= 0.94


def test_static_bound_counts_the_top_avatars_that_fit():
    p = replace(placement_sim.Params(), avatars=4, hosts=1, gpus=1, shm_gb=1.0, slots=2, zipf=(1.0,))
    pop = placement_sim.popularity(p, 1.0)
    sizes = placement_sim.avatar_bytes(p)
    fit = sum(1 for c in sizes.cumsum() if c <= 1e9)
    assert placement_sim.static_bound(p, 1.0, sizes, False) == pytest.approx(pop[:fit].sum())
    assert placement_sim.static_bound(p, 1.0, sizes, True) == pytest.approx(pop[:min(fit, 2)].sum())


def test_deterministic_given_the_seed():
    p = replace(placement_sim.Params(), avatars=600, hosts=4, shm_gb=8.0, slots=4, warmup=2_000,
                requests=2_000, zipf=(1.0,))

    def rows(params):
        return [{k: v for k, v in r.items() if k != "wall_s"}
                for r in placement_sim.run(params, log=lambda *_: None)["rows"]]
    first = rows(p)
    assert rows(p) == first
    assert rows(replace(p, seed=2)) != first


def test_lru_eviction_spares_avatars_in_use():
    h = placement_sim.Host("h", cap_bytes=300, cap_slots=2)
    assert h.place("a", 100) == (False, True)
    assert h.place("b", 100) == (False, True)
    h.release("b")
    assert h.place("a", 100) == (True, True)            # a in use twice now, b idle
    assert h.place("c", 100) == (False, True)           # two slots: b (idle, least recent) goes
    assert h.hot == {"a", "c"} and "b" not in h.lru
    assert h.place("d", 100) == (False, False)          # a and c both in use: overcommitted, not evicted
    assert {"a", "c", "d"} <= h.hot and h.open == 4
