"""Prometheus metrics: the front's recording alone, then a real engine scraped over HTTP during
traffic and parsed with prometheus_client's own parser."""
from __future__ import annotations

import time
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine import protocol as P
from engine.audio.speech import speech_pcm
from engine.client import Client, EngineError
from engine.runtime.metrics import FrontMetrics
from engine.supervisor.metrics_server import EngineCollector, GpuCollector, segment_kind, split_address
from tests.conftest import free_port, kill


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of an exposition, as {(name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap: dict, name: str, **labels: str) -> float:
    return snap.get((name, tuple(sorted(labels.items()))), 0.0)


# -- in-process ----------------------------------------------------------------------------------
def test_front_metrics_count_what_happened():
    reg = CollectorRegistry()
    m = FrontMetrics(True, reg)
    req = P.Request([b"x"], 1, "composite", {})
    job = SimpleNamespace(req=req, model="demo", batch=6, t_recv=10.0, t_start=10.5, t_comp=10.8, infer_ms=200.0)
    m.replied(req, P.ok_reply(1, {}))
    m.batch_done(job, now=11.0)
    m.replied(req, P.error_reply(1, "busy", "x"))
    m.replied(None, P.error_reply(None, "bad_request", "x"))
    m.stream_frame(SimpleNamespace(realtime=True), {"late_ms": 100.0})
    m.stream_frame(SimpleNamespace(realtime=True), {"late_ms": 5.0})
    m.stream_frame(SimpleNamespace(realtime=False), {"late_ms": 0.0})
    m.connection_refused("unknown_key")
    m.quota_exceeded("alice", "streams")
    m.avatar_loaded(SimpleNamespace(state="loaded", name="demo", load_ms=1500.0))
    snap = samples(generate_latest(reg).decode())
    assert value(snap, "lse_requests_total", method="composite", code="ok") == 1
    assert value(snap, "lse_requests_total", method="composite", code="busy") == 1
    assert value(snap, "lse_requests_total", method="invalid", code="bad_request") == 1
    assert value(snap, "lse_requests_total", method="health", code="ok") == 0          # exists before use
    assert value(snap, "lse_request_duration_seconds_sum", method="composite") == pytest.approx(1.0)
    assert value(snap, "lse_queue_duration_seconds_sum", method="composite") == pytest.approx(0.5)
    assert value(snap, "lse_inference_duration_seconds_sum", source="composite") == pytest.approx(0.2)
    assert value(snap, "lse_composite_duration_seconds_sum", source="composite") == pytest.approx(0.2)
    assert value(snap, "lse_batch_size_bucket", source="composite", le="4.0") == 0
    assert value(snap, "lse_batch_size_bucket", source="composite", le="8.0") == 1
    assert value(snap, "lse_frames_total", source="composite") == 6
    assert value(snap, "lse_frames_total", source="stream") == 3
    assert value(snap, "lse_stream_frame_lateness_seconds_count") == 2                  # real-time frames only
    assert value(snap, "lse_stream_late_frames_total") == 1
    assert value(snap, "lse_avatar_requests_total", avatar="demo") == 1
    assert value(snap, "lse_avatar_load_duration_seconds_sum", avatar="demo") == 1.5
    assert value(snap, "lse_connections_refused_total", reason="unknown_key") == 1
    assert value(snap, "lse_quota_exceeded_total", client="alice", quota="streams") == 1
    off = FrontMetrics(False)
    off.replied(req, b"")                            # off: nothing, no error
    off.batch_done(job)


def test_engine_collector_reads_the_supervisor(tmp_path):
    from engine.runtime.config import config_from_dict
    cfg = config_from_dict({"server": {"instance": "nosuchinst"}})
    child = lambda role, restarts, state: SimpleNamespace(role=role, restarts=restarts, state=state)  # noqa: E731
    sup = SimpleNamespace(cfg=cfg, ready=True, children=[child("front", 1, "ready"), child("gpu", 2, "ready"),
                                                         child("compositor", 0, "ready"),
                                                         child("compositor", 3, "starting")],
                          front_state={"streams": [{"lag_ms": 120.0}, {"lag_ms": 40.0}], "pending": 3,
                                       "connections": 2, "loaded_models": 1,
                                       "background_bytes": {"used": 100, "budget": 200},
                                       "gpu_workers": [
                                           {"idx": 0, "architectures": {"a" * 16: {}, "b" * 16: {}},
                                            "resident": {"networks": 5, "bytes": 500, "budget_bytes": 1000,
                                                         "own_sessions": 1, "loads": 7, "evictions": 2}},
                                           {"idx": 1}]})                   # not ready yet: no series
    reg = CollectorRegistry()
    reg.register(EngineCollector(sup))
    snap = samples(generate_latest(reg).decode())
    assert value(snap, "lse_ready") == 1
    assert value(snap, "lse_process_restarts_total", role="compositor") == 3
    assert value(snap, "lse_process_restarts_total", role="gpu") == 2
    assert value(snap, "lse_processes_ready", role="compositor") == 1
    assert value(snap, "lse_streams_open") == 2 and value(snap, "lse_stream_lag_seconds") == 0.12
    assert value(snap, "lse_pending_requests") == 3 and value(snap, "lse_avatar_memory_budget_bytes") == 200
    assert value(snap, "lse_shared_memory_bytes", kind="ring") == 0
    # per GPU worker: its resident networks; sessions = its own-session networks + one per architecture
    assert value(snap, "lse_networks_resident", worker="0") == 5 and value(snap, "lse_network_bytes", worker="0") == 500
    assert value(snap, "lse_network_budget_bytes", worker="0") == 1000
    assert value(snap, "lse_network_sessions", worker="0") == 3
    assert value(snap, "lse_network_loads_total", worker="0") == 7
    assert value(snap, "lse_network_evictions_total", worker="0") == 2
    assert not [k for k in snap if k[0].startswith("lse_network") and ("worker", "1") in k[1]]


def test_no_gpu_means_no_gpu_series_and_no_error():
    reg = CollectorRegistry()
    gpu = GpuCollector()
    reg.register(gpu)
    text = generate_latest(reg).decode()
    if gpu.nvml is None:                             # this machine has no NVIDIA driver
        assert "lse_gpu" not in text
    else:                                            # a GPU machine: one series per GPU
        assert "lse_gpu_utilization_ratio" in text and "lse_gpu_memory_total_bytes" in text


def test_dashboard_and_readme_name_only_metrics_that_exist():
    import json
    import re
    from pathlib import Path

    from engine.runtime.config import config_from_dict
    from engine.supervisor.metrics_server import GPU_METRICS
    reg = CollectorRegistry()
    FrontMetrics(True, reg)
    reg.register(EngineCollector(SimpleNamespace(cfg=config_from_dict({}), ready=True, children=[],
                                                 front_state={})))
    names = set(GPU_METRICS)
    for family in reg.collect():                     # every family, with or without samples yet
        suffixes = {"counter": ["_total"], "histogram": ["", "_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"lse_[a-z_]+", e)}
    assert used and used <= names, used - names
    # no label the engine sets is one Prometheus owns on every scraped series (a scrape renames a
    # target's `job` or `instance` to `exported_job`, and dashboards grouping by it mix series up)
    labels = {label for c in list(reg._collector_to_names) for label in getattr(c, "_labelnames", ())}
    labels |= {"role", "kind"}                       # the supervisor's families (lse_processes_*, lse_shared_memory_*)
    assert {"method", "source", "avatar"} <= labels and not labels & {"job", "instance"}, labels
    grouped = {g.strip() for e in exprs for by in re.findall(r"by \(([^)]*)\)", e) for g in by.split(",")}
    assert grouped <= labels | {"le"}, grouped - labels
    readme = (root / "README.md").read_text()
    table = readme[readme.index("## Monitoring"):readme.index("**Logs.**")]
    documented = set(re.findall(r"`(lse_[a-z_]+)`", table))
    bases = {n for n in names if not re.search(r"_(bucket|sum|count)$", n)}
    assert documented <= bases, documented - bases
    assert bases - {n for n in bases if n + "_total" in bases} <= documented, bases - documented


def test_helpers():
    assert split_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert split_address("[::1]:9464") == ("::1", 9464)
    assert [segment_kind(n, "lse") for n in ("lse_ring_g0", "lse_av_demo_3", "lse_hb", "lse_x")] == \
        ["ring", "avatar", "heartbeat", "other"]


def test_reply_code_never_misreads_an_id():
    for rid in ('","status":"error', ',"status":"ok', 7, None, "x"):
        assert P.reply_code(P.ok_reply(rid, {"status": "error"})) == "ok"
        assert P.reply_code(P.error_reply(rid, "busy", '"status":"ok"')) == "busy"


# -- a real engine ---------------------------------------------------------------------------------
def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return samples(r.read().decode())


def audio(batch: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 32, 16, 16)).astype(np.float32)


@pytest.fixture
def metrics_engine(engine_factory):
    port = free_port()
    eng = engine_factory(server=f'metrics = "127.0.0.1:{port}"')
    return eng, f"http://127.0.0.1:{port}/metrics"


@pytest.mark.integration
def test_counters_and_histograms_move_as_the_requests_say(metrics_engine):
    eng, url = metrics_engine
    N, B, K = 4, 5, 3
    with Client(eng.endpoint, timeout=120) as c:
        c.load("demo")
        before = scrape(url)
        for i in range(N):
            assert len(c.composite("demo", audio(B, i), start_frame=i * B).frames) == B
            mid = scrape(url)                        # scraped during the traffic, after each reply
            assert value(mid, "lse_frames_total", source="composite") - \
                value(before, "lse_frames_total", source="composite") == (i + 1) * B
        for _ in range(K):
            with pytest.raises(EngineError, match="unknown_model"):
                c.composite("nosuchavatar", audio(B))
        c.infer("demo", audio(2))
        after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)
    assert delta("lse_frames_total", source="composite") == N * B
    assert delta("lse_requests_total", method="composite", code="ok") == N
    assert delta("lse_requests_total", method="composite", code="unknown_model") == K
    assert delta("lse_requests_total", method="infer", code="ok") == 1
    assert delta("lse_request_duration_seconds_count", method="composite") == N
    assert delta("lse_queue_duration_seconds_count", method="composite") == N
    assert delta("lse_inference_duration_seconds_count", source="composite") == N
    assert delta("lse_inference_duration_seconds_count", source="infer") == 1
    assert delta("lse_composite_duration_seconds_count", source="composite") == N
    assert delta("lse_batch_size_count", source="composite") == N
    assert delta("lse_batch_size_sum", source="composite") == N * B
    assert delta("lse_batch_size_bucket", source="composite", le="4.0") == 0
    assert delta("lse_batch_size_bucket", source="composite", le="8.0") == N
    assert delta("lse_avatar_requests_total", avatar="demo") == N + 1
    assert value(after, "lse_avatar_load_duration_seconds_count", avatar="demo") == 1
    assert delta("lse_request_duration_seconds_sum", method="composite") >= \
        delta("lse_inference_duration_seconds_sum", source="composite") > 0
    assert value(after, "lse_ready") == 1
    assert value(after, "lse_processes_ready", role="compositor") == 2
    assert value(after, "lse_shared_memory_bytes", kind="ring") > 0
    assert value(after, "lse_shared_memory_bytes", kind="avatar") > 0
    deadline = time.monotonic() + 5                  # gauges from the front's health snapshot: a second old at most
    while value(scrape(url), "lse_avatars_loaded") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.mark.integration
def test_stream_frames_and_restarts_survive_a_front_restart(metrics_engine):
    eng, url = metrics_engine
    with Client(eng.endpoint, timeout=120) as c:
        s = c.open_stream("demo", realtime=True)
        s.push(speech_pcm(1.0), end=True)
        got = list(s.frames(60))
    snap = scrape(url)
    assert value(snap, "lse_frames_total", source="stream") == len(got) > 20
    assert value(snap, "lse_streams_opened_total") == 1
    assert value(snap, "lse_stream_frame_lateness_seconds_count") == len(got)
    assert value(snap, "lse_batch_size_sum", source="stream") >= len(got) - 1     # the silent tail may be idle

    kill(eng.pid_of("compositor", 1))
    deadline = time.monotonic() + 60
    while value(scrape(url), "lse_process_restarts_total", role="compositor") != 1:
        assert time.monotonic() < deadline, "compositor restart not counted"
        time.sleep(0.3)
    ok_before = value(scrape(url), "lse_requests_total", method="stream_open", code="ok")
    assert ok_before == 1
    kill(eng.pid_of("front"))                        # every process is replaced; the counters stay
    deadline = time.monotonic() + 90
    while True:
        try:
            st = eng.status(2.0)
        except AssertionError:
            st = {}
        if st.get("ready") and all(p["state"] == "ready" for p in st.get("processes", [])) and \
                any(p["role"] == "front" and p["restarts"] == 1 for p in st.get("processes", [])):
            break
        assert time.monotonic() < deadline, "engine not back after the front was killed"
        time.sleep(0.3)
    with Client(eng.endpoint, timeout=120) as c:
        assert len(c.composite("demo", audio(3)).frames) == 3
    snap = scrape(url)
    assert value(snap, "lse_process_restarts_total", role="front") == 1
    assert value(snap, "lse_process_restarts_total", role="compositor") == 3     # 1 + both replaced with the front
    assert value(snap, "lse_process_restarts_total", role="gpu") == 1
    assert value(snap, "lse_requests_total", method="stream_open", code="ok") == ok_before   # not reset
    assert value(snap, "lse_frames_total", source="stream") == len(got)
    assert value(snap, "lse_frames_total", source="composite") == 3
