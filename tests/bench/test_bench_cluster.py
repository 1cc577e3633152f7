"""The cluster's resolve path on an emulated 3-host cluster (``engine-ctl cluster start --emulate 3``:
real Ray Serve, three real engines holding 30 small avatars and the demo), every avatar hot: resolve
latency over HTTP on loopback (``resolve()`` as ``Client.for_avatar`` calls it: a connection kept
alive per thread) to the router's own listener and through Serve's proxy, the same client against a
bare Serve deployment answering a constant (Serve's HTTP path without the router) and against a
standard-library HTTP server (no Ray: the client and loopback alone), each HTTP path again with a
new connection per resolve, through a ``DeploymentHandle`` from a driver process, resolves per second with a few client
threads calling ``resolve()``, and the emulation's memory (PSS, Ray's processes apart from the
engines') and start-up time. Prints the figures and a summary line; asserts nothing about time.

    ./tools/dev test tests/bench/test_bench_cluster.py --benchmark-enable -s
    LSE_CLUSTER_RESOLVES=2000 LSE_CLUSTER_SECONDS=10 LSE_CLUSTER_IDLE_S=10 ./tools/dev test tests/bench/test_bench_cluster.py --benchmark-enable -s

(the suite runs 100 resolves per figure, 1 s of load with 4 threads, ``LSE_CLUSTER_THREADS``, and
3 s of idle CPU; docs/performance.md, "Beyond one host", has the longer run). The cluster is
tests/cluster/test_cluster.py's fixture: in the suite both modules use the same one, this one first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from engine.client.resolve import resolve
from engine.runtime.config import load_config
from engine.supervisor.control import read_pid
from engine.testing.measure import Report, percentiles, record
from tests.cluster.test_cluster import AVATARS, cluster, make_hot, ray_processes, wait_ready  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

RESOLVES = int(os.environ.get("LSE_CLUSTER_RESOLVES", "100"))
SECONDS = float(os.environ.get("LSE_CLUSTER_SECONDS", "1"))
THREADS = int(os.environ.get("LSE_CLUSTER_THREADS", "4"))
WARMUP = 50
IDLE_S = float(os.environ.get("LSE_CLUSTER_IDLE_S", "3"))
TARGET_P99_S = 0.005
CONSTANT_APP = "bench-constant"


@pytest.fixture(scope="module")
def hot(cluster):  # noqa: F811
    """The cluster with every avatar resolved once and hot where it resolves."""
    wait_ready(cluster["url"])
    make_hot(cluster["url"])
    return cluster


@pytest.fixture(scope="module")
def summary():
    out: dict = {}
    yield out
    if out:
        print("\n" + summary_line(out))


def summary_line(out: dict) -> str:
    parts = []
    if "http" in out:
        p50, p99 = out["http"]
        met = "met" if p99 <= TARGET_P99_S else "NOT met"
        parts.append(f"resolve() at the router's listener p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms "
                     f"(target p99 <= 5 ms on loopback: {met})")
    if "proxy" in out:
        parts.append("through Serve's proxy p50 {:.2f} / p99 {:.2f} ms".format(*(x * 1e3 for x in out["proxy"])))
    if "constant" in out:
        parts.append("bare Serve constant p50 {:.2f} / p99 {:.2f} ms".format(*(x * 1e3 for x in out["constant"])))
    if "plain" in out:
        parts.append("plain HTTP server (no Ray) p50 {:.2f} / p99 {:.2f} ms".format(*(x * 1e3 for x in out["plain"])))
    if "handle" in out:
        parts.append("handle p50 {:.2f} / p99 {:.2f} ms".format(*(x * 1e3 for x in out["handle"])))
    if "rps" in out:
        parts.append(f"{out['rps']:.0f} resolves/s with {THREADS} threads")
    if "memory" in out:
        m = out["memory"]
        parts.append(f"memory ({m['measure']}) {m['total_mb']:.0f} MB: Ray {m['ray_mb']:.0f} MB, "
                     f"engines {m['engines_mb']:.0f} MB")
    if "start" in out:
        parts.append("start-up {:.1f} s (engines {:.1f} s)".format(*out["start"]))
    return "cluster bench: " + "; ".join(parts)


def timed(call, seq: list[str]) -> list[float]:
    for name in seq[:WARMUP]:
        call(name)
    samples = []
    for name in seq:
        t0 = time.perf_counter()
        call(name)
        samples.append(time.perf_counter() - t0)
    return samples


def names(n: int = RESOLVES) -> list[str]:
    return [AVATARS[i % len(AVATARS)] for i in range(n)]


def router_seconds(url: str) -> tuple[float, float]:
    """The router's own resolve time so far (the ranking: ``lse_cluster_resolve_seconds`` sum, count)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    series = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return float(series["lse_cluster_resolve_seconds_sum"]), float(series["lse_cluster_resolve_seconds_count"])


def new_connection_caller(url: str):
    """A resolve over a new TCP connection each time (urllib), checked like resolve()'s."""
    def call(name: str) -> dict:
        q = urllib.parse.urlencode({"avatar": name})
        with urllib.request.urlopen(f"{url}/resolve?{q}", timeout=5) as r:
            body = json.loads(r.read())
        assert r.status == 200 and body["endpoint"], body
        return body
    return call


def report(benchmark, summary, key: str, name: str, samples: list[float], **extra) -> Report:
    r = record(benchmark, Report(name, samples, extra=extra))
    summary[key] = (r.p50, r.p99)
    print(f"\n{name}: p50 {r.p50 * 1e3:.2f} ms, p95 {r.p95 * 1e3:.2f} ms, p99 {r.p99 * 1e3:.2f} ms, "
          f"max {max(samples) * 1e3:.2f} ms over {len(samples)} sequential resolves" +
          "".join(f"; {k} {v}" for k, v in extra.items()))
    return r


def tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def label(p: psutil.Process) -> str:
    """A Ray worker's title (``ray::ServeReplica:lse:Router``), a Python script's or module's name, or
    a program's."""
    args = p.cmdline() or [p.name()]
    if args[0].startswith("ray::"):
        return args[0].split()[0]
    prog = os.path.basename(args[0].split()[0])
    if prog.startswith("python"):
        if "-m" in args[1:-1]:
            return args[args.index("-m") + 1]
        scripts = [a for a in args[1:] if not a.startswith("-")]
        return os.path.basename(scripts[0]) if scripts else prog
    return prog


def cpu_seconds(procs: dict[int, psutil.Process]) -> float:
    total = 0.0
    for p in procs.values():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def test_memory_and_start_up(benchmark, hot, summary):
    """PSS (proportional set size: shared pages split among the processes that map them) of the
    emulation's processes, Ray's apart from the engines', with every avatar hot; the CPU they take
    while idle; and the start-up time ``engine-ctl cluster start`` wrote in state.json."""
    state = hot["state"]
    engines: dict[int, psutil.Process] = {}
    for h in state["hosts"]:
        pid = read_pid(load_config(h["config"]))
        assert pid is not None, f"engine {h['host']} has no pid"
        engines.update((p.pid, p) for p in tree(pid))
    ray: dict[int, psutil.Process] = {p.pid: p for p in tree(int(state["pid"])) if p.pid not in engines}
    for p in ray_processes(hot["ray_tmp"]):                         # any Ray process outside that tree
        ray.setdefault(p.pid, p)
    ray = {pid: p for pid, p in ray.items() if pid not in engines}

    def measure(procs: dict[int, psutil.Process]) -> tuple[dict[str, float], str]:
        sizes, how = {}, "PSS"
        for pid, p in procs.items():
            try:
                info = p.memory_full_info()
                size = getattr(info, "pss", None)
                if size is None:
                    how, size = "USS", info.uss
                sizes[f"{pid} {label(p)}"] = size / 1e6
            except psutil.Error:
                pass
        return sizes, how
    ray_mb, how_r = measure(ray)
    eng_mb, how_e = measure(engines)
    how = how_r if how_r == how_e else f"{how_r}/{how_e}"
    mem = {"measure": how, "ray_mb": sum(ray_mb.values()), "engines_mb": sum(eng_mb.values()),
           "ray_processes": len(ray_mb), "engine_processes": len(eng_mb)}
    mem["total_mb"] = mem["ray_mb"] + mem["engines_mb"]
    c0, e0, t0 = cpu_seconds(ray), cpu_seconds(engines), time.monotonic()
    time.sleep(IDLE_S)                                          # idle: the router's polls, Ray's own work
    dt = time.monotonic() - t0
    mem["idle_cpu_ray"] = (cpu_seconds(ray) - c0) / dt
    mem["idle_cpu_engines"] = (cpu_seconds(engines) - e0) / dt
    summary["memory"] = mem
    summary["start"] = (state["started_s"], state["engines_s"])
    record(benchmark, Report("emulated 3-host cluster start-up", [state["started_s"]], extra={
        "engines_s": state["engines_s"], **{k: round(v, 3) if isinstance(v, float) else v for k, v in mem.items()}}))
    top = sorted(ray_mb.items(), key=lambda kv: -kv[1])
    print(f"\nemulated 3-host cluster: start-up {state['started_s']} s (engines {state['engines_s']} s, "
          f"then Ray, Serve, the router and the agents {state['started_s'] - state['engines_s']:.1f} s); "
          f"memory ({how}) {mem['total_mb']:.0f} MB: Ray {mem['ray_mb']:.0f} MB in {len(ray_mb)} processes, "
          f"the 3 engines {mem['engines_mb']:.0f} MB in {len(eng_mb)} processes; idle, over {IDLE_S:g} s: "
          f"Ray {mem['idle_cpu_ray']:.2f} cores, the engines {mem['idle_cpu_engines']:.2f} cores")
    print("  Ray's processes (MB): " + ", ".join(f"{name.split(' ', 1)[1]} {mb:.0f}" for name, mb in top))


def test_resolve_over_http(benchmark, hot, summary):
    """``resolve()`` as clients call it, at the router's own listener (the URL ``cluster start``
    prints): one connection kept alive; and the same with a new connection each time."""
    s0, c0 = router_seconds(hot["url"])
    samples, extra, replies = both_ways(hot["url"], hot)
    s1, c1 = router_seconds(hot["url"])
    hits = sum(r["hot"] for r in replies[-RESOLVES:]) / RESOLVES
    report(benchmark, summary, "http", "resolve() at the router's listener (kept-alive connection)", samples,
           hot_share=round(hits, 4), router_ranking_ms=round((s1 - s0) / (c1 - c0) * 1e3, 4), **extra)


def test_resolve_through_serve_proxy(benchmark, hot, summary):
    """The same client through Serve's HTTP proxy (``serve_url``; on the head node only in the emulation)."""
    samples, extra, _ = both_ways(hot["state"]["serve_url"], hot)
    report(benchmark, summary, "proxy", "resolve() through Serve's proxy (kept-alive connection)", samples, **extra)


def both_ways(url: str, hot: dict | None = None) -> tuple[list[float], dict, list[dict]]:
    """``resolve()`` (this thread's kept-alive connection) timed, then a new connection each time:
    the first's samples, the second's p50/p99, the replies (checked: engines of the cluster)."""
    replies: list[dict] = []
    samples = timed(lambda n: replies.append(resolve(url, n)), names())
    fresh = timed(new_connection_caller(url), names())
    if hot is not None:
        assert {r["endpoint"] for r in replies} <= {h["endpoint"] for h in hot["state"]["hosts"]}
    k = percentiles(fresh)
    return samples, {"new_connection_p50_ms": round(k["p50"] * 1e3, 2),
                     "new_connection_p99_ms": round(k["p99"] * 1e3, 2)}, replies


# A Ray driver for the handle and the constant app, in its own process: Ray reads
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported, and without it set to 0 ray.init rewrites the
# emulation's 127.0.0.1 address to this machine's interface address, where nothing listens.
DRIVER = r"""
import json, sys, time
address, action, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import ray
from ray import serve
ray.init(address=address, logging_level="WARNING", log_to_driver=False)
out = {}
if action == "handle":
    handle = serve.get_app_handle("lse")
    for name in arg["names"][:arg["warmup"]]:
        handle.resolve.remote(name).result(timeout_s=10)
    samples, endpoints = [], set()
    for name in arg["names"]:
        t0 = time.perf_counter()
        reply = handle.resolve.remote(name).result(timeout_s=10)
        samples.append(time.perf_counter() - t0)
        endpoints.add(reply["endpoint"])
    out = {"samples": samples, "endpoints": sorted(endpoints)}
elif action == "deploy-constant":
    from starlette.responses import JSONResponse
    body = arg["body"]

    class Constant:
        async def __call__(self, request):
            return JSONResponse(body)
    app = serve.deployment(Constant).options(name="Constant", num_replicas=1, ray_actor_options={"num_cpus": 0})
    serve.run(app.bind(), name=arg["app"], route_prefix="/" + arg["app"], blocking=False)
elif action == "delete":
    serve.delete(arg["app"])
print(json.dumps(out))
"""

# The floor: the same reply from a standard-library HTTP server in its own process, no Ray.
PLAIN_SERVER = r"""
import http.server, json, sys
body = sys.argv[1].encode()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1                        # headers and body in one write (no Nagle wait on kept-alive)
    disable_nagle_algorithm = True

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def ray_env(hot: dict) -> dict[str, str]:
    """The emulation's Ray settings (engine.cluster.deploy.ray_environment), this process's untouched."""
    from engine.cluster.deploy import ray_environment
    saved = dict(os.environ)
    try:
        return {**saved, **ray_environment(Path(hot["cfg"]).parent / "run")}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def drive(hot: dict, action: str, timeout: float = 300, **arg) -> dict:
    r = subprocess.run([sys.executable, "-c", DRIVER, hot["state"]["ray_address"], action, json.dumps(arg)],
                       capture_output=True, text=True, timeout=timeout, env=ray_env(hot))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def reply_body(hot: dict) -> dict:
    """A body the size and shape of a resolve reply."""
    return {"avatar": "c00", "host": "h0", "endpoint": hot["state"]["hosts"][0]["endpoint"], "hot": True,
            "server_key": None}


def wait_answers(url: str, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            resolve(url, "c00")
            return
        except Exception:
            assert time.monotonic() < deadline, f"{what} did not answer within 60 s"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def constant_url(hot):
    """A bare Serve deployment under the same proxy that answers every request with a constant
    reply: what Serve's HTTP path costs without the router's work."""
    drive(hot, "deploy-constant", app=CONSTANT_APP, body=reply_body(hot))
    u = urllib.parse.urlsplit(hot["state"]["serve_url"])
    url = f"{u.scheme}://{u.netloc}/{CONSTANT_APP}"
    wait_answers(url, "the constant app")
    yield url
    drive(hot, "delete", app=CONSTANT_APP)


@pytest.fixture(scope="module")
def plain_url(hot):
    proc = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, json.dumps(reply_body(hot))],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(proc.stdout.readline())}/lse"
        wait_answers(url, "the plain HTTP server")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_bare_serve_constant_over_http(benchmark, constant_url, summary):
    """The same client calls against a deployment that does nothing: Serve's proxy and replica alone."""
    samples, extra, _ = both_ways(constant_url)
    report(benchmark, summary, "constant", "bare Serve constant over HTTP (kept-alive connection)", samples, **extra)


def test_plain_http_server_without_ray(benchmark, plain_url, summary):
    """The same client calls against a standard-library HTTP server: the client and loopback alone."""
    samples, extra, _ = both_ways(plain_url)
    report(benchmark, summary, "plain", "plain HTTP server, no Ray (kept-alive connection)", samples, **extra)


def test_resolve_through_a_handle(benchmark, hot, summary):
    """``serve.get_app_handle("lse").resolve.remote(name).result()`` from a driver process."""
    out = drive(hot, "handle", names=names(), warmup=WARMUP)
    assert set(out["endpoints"]) <= {h["endpoint"] for h in hot["state"]["hosts"]}
    report(benchmark, summary, "handle", "resolve through a DeploymentHandle", out["samples"])


def test_resolves_per_second_over_http(benchmark, hot, summary):
    """``THREADS`` client threads calling ``resolve()`` (a kept-alive connection each) at the router's
    listener for ``SECONDS``."""
    url = hot["url"]
    lat: list[list[float]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS + 1)
    stop = threading.Event()

    def client(k: int) -> None:
        i = k
        start.wait()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                resolve(url, AVATARS[i % len(AVATARS)])
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            lat[k].append(time.perf_counter() - t0)
            i += THREADS

    threads = [threading.Thread(target=client, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join(30)
    wall = time.perf_counter() - t0
    samples = [x for xs in lat for x in xs]
    rps = len(samples) / wall
    summary["rps"] = rps
    r = record(benchmark, Report(f"resolves x{THREADS} threads", samples, extra={
        "threads": THREADS, "seconds": round(wall, 2), "resolves_per_second": round(rps, 1),
        "errors": len(errors)}))
    print(f"\n{THREADS} threads resolving over HTTP for {wall:.1f} s: {rps:.0f} resolves/s, "
          f"latency p50 {r.p50 * 1e3:.2f} ms, p99 {r.p99 * 1e3:.2f} ms, {len(errors)} errors")
    assert not errors, errors[:3]
