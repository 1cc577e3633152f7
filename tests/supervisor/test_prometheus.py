"""The Grafana dashboard's queries against a real Prometheus (Debian's prometheus, started here)
scraping a real engine: every query parses and runs, the core panels have data, and no series of
the engine carries a label Prometheus renames (``exported_job``)."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from engine import Client, EngineError
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:            # a query Prometheus refuses: 400 with the reason
        return json.loads(e.read())


def dashboard_queries() -> list[str]:
    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def grafana(expr: str) -> str:
    """Grafana's variables as the dashboard would fill them for this engine."""
    return expr.replace("$job", "lse").replace("$__rate_interval", "1m").replace("$__range", "5m")


@pytest.mark.integration
def test_the_dashboards_queries_run_on_a_real_prometheus_scraping_the_engine(engine_factory, tmp_path):
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is not installed: ./tools/dev test installs Debian's prometheus as root"
    mport = free_port()
    eng = engine_factory(server=f'metrics = "127.0.0.1:{mport}"')
    pport = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: lse\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{mport}']\n")
    base = f"http://127.0.0.1:{pport}"
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{pport}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                up = query(base, 'up{job="lse"}')["data"]["result"]
                if up and up[0]["value"][1] == "1":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        rng = np.random.default_rng(0)
        with Client(eng.endpoint, timeout=120) as c:
            for i in range(4):                          # traffic spread over several scrapes
                c.composite("demo", rng.standard_normal((3, 32, 16, 16)).astype(np.float32), start_frame=3 * i)
                with pytest.raises(EngineError):
                    c.composite("nosuchavatar", rng.standard_normal((1, 32, 16, 16)).astype(np.float32))
                time.sleep(1.2)
            s = c.open_stream("demo", realtime=False)
            s.push(np.zeros(8000, np.int16), end=True)
            assert len(list(s.frames(60))) == 13
            (worker,) = c.health()["gpu_workers"]
        time.sleep(3)
        results = {}
        for expr in dashboard_queries():
            r = query(base, grafana(expr))
            assert r["status"] == "success", (expr, r.get("error"))
            results[expr] = r["data"]["result"]

        def series(fragment: str) -> list[dict]:
            return next(v for k, v in results.items() if fragment in k)
        by_source = {x["metric"].get("source") for x in series("sum by (source) (rate(lse_frames_total")}
        assert {"composite", "stream"} <= by_source
        errors = {(x["metric"]["method"], x["metric"]["code"]) for x in series("sum by (method, code)")}
        assert ("composite", "unknown_model") in errors
        p99 = series("histogram_quantile(0.99, sum by (method, le) (rate(lse_request_duration_seconds_bucket")
        assert any(x["metric"].get("method") == "composite" and float(x["value"][1]) > 0 for x in p99)
        assert {x["metric"]["role"] for x in series("sum by (role) (lse_processes_ready")} >= {"front", "gpu", "compositor"}
        assert {x["metric"]["kind"] for x in series("sum by (kind) (lse_shared_memory_bytes")} >= {"ring", "avatar"}
        # every series of the engine, as Prometheus stored it: no label was renamed on the way
        every = query(base, '{job="lse"}')["data"]["result"]
        assert every and not [x for x in every if any(k.startswith("exported_") for k in x["metric"])]
        workers = query(base, 'lse_networks_resident{job="lse"}')["data"]["result"]
        assert [x["metric"]["worker"] for x in workers] == ["0"] and float(workers[0]["value"][1]) >= 1

        def scalar(name: str) -> float:
            (x,) = query(base, f'{name}{{job="lse",worker="0"}}')["data"]["result"]
            return float(x["value"][1])
        # the network series carry the worker's own figures: demo's network, loaded once, its own session
        nets = worker["networks"]
        assert list(nets) == ["demo"] and scalar("lse_networks_resident") == 1
        assert scalar("lse_network_bytes") == sum(n["weight_bytes"] for n in nets.values()) > 0
        assert scalar("lse_network_loads_total") >= len(nets) and scalar("lse_network_evictions_total") == 0
        assert scalar("lse_network_sessions") == worker["resident"]["own_sessions"] + len(worker["architectures"]) == 1
        assert scalar("lse_network_budget_bytes") == worker["resident"]["budget_bytes"] > 0
    finally:
        proc.terminate()
        proc.wait(10)
