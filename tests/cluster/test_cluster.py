"""Three engines behind real Ray Serve on this machine (``engine-ctl cluster start --emulate 3``):
avatars requested in a Zipf-like sequence land where they are hot, a live stream keeps its host, a
drained host takes nothing new while its stream ends normally, an engine killed with SIGKILL has its
avatars resolve elsewhere within 10 s, and with Ray stopped the streams go on while resolve fails
clearly until Ray is back. One emulated cluster for the module, the cluster bench's
(tests/bench/test_bench_cluster.py) when that ran right before it (the suite: one xdist unit, the
bench first); otherwise its own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from engine.audio.speech import speech_pcm
from engine.cli.demo_avatars import make_audio_encoder, make_demo
from engine.client import Client, EngineError
from engine.client.resolve import ResolveError, resolve
from engine.runtime.config import load_config
from engine.runtime.shm import list_segments
from tests.conftest import NEXT_ITEM, free_port, write_config
from tests.nets import make_avatar
from tests.integration.test_shared_sessions import small_frames

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

AVATARS = [f"c{i:02d}" for i in range(30)]
AUDIO = np.random.default_rng(3).standard_normal((1, 32, 16, 16)).astype(np.float32)


def ctl(cfg: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", "--config", str(cfg), "cluster", *args],
                          capture_output=True, text=True, timeout=timeout)


def ray_processes(tmp: str) -> list[psutil.Process]:
    """Ray's processes whose temp dir is ``tmp`` (this cluster's, not any other)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(tmp in a for a in p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            pass
    return out


_running: dict | None = None            # the emulated cluster, while one runs


@pytest.fixture(scope="module")
def cluster(no_realtime_beside, tmp_path_factory, request):  # Ray's start-up and idle load: no real-time test beside it
    """The emulated 3-host cluster. A module that uses it after another (the cluster bench, then this
    module: one xdist unit, tests/scheduling.py) gets the same one: it is stopped when the next test
    does not use it (the last module's teardown), not at each module's end; Ray's start is ~25 s."""
    global _running
    if _running is None:
        _running = start_cluster(tmp_path_factory)
    yield _running
    nextitem = request.config.stash.get(NEXT_ITEM, None)
    if nextitem is not None and "cluster" in nextitem.fixturenames:
        return
    running, _running = _running, None
    stop_cluster(running)


def start_cluster(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("cluster")
    models = tmp / "models"
    make_demo(models, frames=12)
    make_audio_encoder(models)
    small = small_frames(models / "small_src")
    for i, name in enumerate(AVATARS):
        make_avatar(models, name, 500 + i, small)
    cfg = write_config(tmp / "engine.toml", models, tmp / "run", f"t{os.getpid()}cl", "[compositor]\nprocesses = 1\n",
                       server=os.environ.get("LSE_CLUSTER_TEST_SERVER", ""))
    port, rport = free_port(), free_port()
    while rport == port:
        rport = free_port()
    r = ctl(cfg, "start", "--emulate", "3", "--detach", "--http-port", str(port), "--resolve-port", str(rport))
    assert r.returncode == 0, r.stdout + r.stderr
    state = json.loads((tmp / "run" / "cluster" / "state.json").read_text())
    print(f"\nemulated 3-host cluster ready in {state['started_s']} s (engines {state['engines_s']} s)")
    ray_tmp = os.environ.get("RAY_TMPDIR") or _ray_tmp(tmp / "run")
    assert state["url"] == f"http://127.0.0.1:{rport}/lse"                # the router's own listener
    assert state["serve_url"] == f"http://127.0.0.1:{port}/lse"           # Serve's proxy
    return {"cfg": cfg, "url": state["url"], "state": state, "port": port, "rport": rport, "ray_tmp": ray_tmp}


def stop_cluster(cluster: dict) -> None:
    """``cluster stop``, then nothing of it left: no segment of its engines, no Ray process, no Ray files."""
    r = ctl(cluster["cfg"], "stop")
    assert r.returncode == 0, r.stdout + r.stderr
    hosts = [load_config(h["config"]) for h in cluster["state"]["hosts"]]
    ray_tmp = cluster["ray_tmp"]
    deadline = time.monotonic() + 20
    while any(list_segments(f"{h.server.instance}_") for h in hosts) or ray_processes(ray_tmp):
        assert time.monotonic() < deadline, ([list_segments(f"{h.server.instance}_") for h in hosts],
                                             ray_processes(ray_tmp))
        time.sleep(0.5)
    assert not Path(ray_tmp).exists()                       # Ray's files went with it


def _ray_tmp(run_dir: Path) -> str:
    from engine.cluster.deploy import ray_environment
    saved = dict(os.environ)
    try:
        return ray_environment(run_dir)["RAY_TMPDIR"]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def wait_ready(url: str, hosts: int = 3, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/status", timeout=5) as r:
                st = json.load(r)
            if sum(h["healthy"] for h in st["hosts"]) == hosts:
                return st
        except OSError:
            pass
        assert time.monotonic() < deadline, "the router did not see every host healthy"
        time.sleep(0.5)


def make_hot(url: str, timeout: float = 120) -> None:
    """Resolve every avatar until each is hot where it resolves (the first resolve asks for a load)."""
    deadline, cold = time.monotonic() + timeout, list(AVATARS)
    while cold:
        assert time.monotonic() < deadline, f"not hot after {timeout:g} s: {cold}"
        cold = [a for a in cold if not resolve(url, a)["hot"]]
        time.sleep(0.5 if cold else 0)


def holds(endpoint: str, avatar: str) -> bool:
    with Client(endpoint, timeout=10) as c:
        return any(m["name"] == avatar and m["state"] == "loaded" for m in c.models())


def test_zipf_requests_land_where_their_avatar_is_hot(cluster):
    url = cluster["url"]
    wait_ready(url)
    rng = np.random.default_rng(11)
    p = 1.0 / np.arange(1, len(AVATARS) + 1)
    seq = [AVATARS[i] for i in rng.choice(len(AVATARS), size=150, p=p / p.sum())]
    seq = AVATARS + seq                                     # every avatar once (warm-up), then Zipf
    clients: dict[str, Client] = {}
    hits = []
    try:
        for k, name in enumerate(seq):
            where = resolve(url, name)
            if where["endpoint"] not in clients:
                clients[where["endpoint"]] = Client(where["endpoint"], timeout=60)
            c = clients[where["endpoint"]]
            jpegs = c.composite(name, AUDIO).frames
            assert len(jpegs) == 1 and jpegs[0][:2] == b"\xff\xd8"
            if k >= len(AVATARS):
                hits.append(where["hot"])
                assert holds(where["endpoint"], name)       # the router's "hot" is the engine's "loaded"
    finally:
        for c in clients.values():
            c.close()
    ratio = sum(hits) / len(hits)
    st = json.load(urllib.request.urlopen(url + "/status", timeout=5))
    spread = {h["host"]: len(h["hot"]) for h in st["hosts"]}
    print(f"\nafter warm-up, {100 * ratio:.1f}% of {len(hits)} requests landed where their avatar was hot; "
          f"avatars hot per host {spread}; router's hit ratio {st['hit_ratio']}")
    assert ratio >= 0.9
    assert sum(spread.values()) >= len(AVATARS) and min(spread.values()) >= 5     # spread over the hosts
    with Client.for_avatar(url, AVATARS[0], timeout=30) as c:          # the client resolves for the caller
        assert holds(c.resolved, AVATARS[0]) and c.composite(AVATARS[0], AUDIO).frames
    assert st["listen"] == url                                          # status names the fast path
    proxy = cluster["state"]["serve_url"]                               # Serve's proxy: the same router
    for name in AVATARS[:5]:
        assert resolve(proxy, name)["endpoint"] == resolve(url, name)["endpoint"]
    assert json.load(urllib.request.urlopen(proxy + "/status", timeout=5))["listen"] == url


def run_stream(url: str, seconds: float, out: dict) -> None:
    """A live stream of the demo avatar through Client.for_avatar: ``seconds`` of speech in real time."""
    try:
        with Client.for_avatar(url, "demo", timeout=60) as c:
            out["endpoint"] = c.resolved
            s = c.open_stream("demo", realtime=True)
            pcm = speech_pcm(seconds, seed=4)
            for i in range(0, len(pcm), 3200):
                s.push(pcm[i:i + 3200])
                out.setdefault("frames", []).extend(s.poll(0.0))
                time.sleep(0.2)
            s.end()
            out["frames"].extend(s.frames(timeout=30))
            out["done"] = True
    except BaseException as e:  # noqa: BLE001
        out["error"] = e


def streaming(url: str, seconds: float) -> tuple[threading.Thread, dict]:
    """:func:`run_stream` in a thread, once its first frames have come."""
    out: dict = {}
    t = threading.Thread(target=run_stream, args=(url, seconds, out))
    t.start()
    deadline = time.monotonic() + 30
    while "frames" not in out and t.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return t, out


def test_a_live_stream_keeps_its_host_and_a_drained_host_takes_nothing_new(cluster):
    url, cfg = cluster["url"], cluster["cfg"]
    wait_ready(url)
    t, out = streaming(url, 6.0)
    host = resolve(url, "demo")
    assert host["endpoint"] == out["endpoint"] and host["hot"]          # demo stays where its stream runs
    r = ctl(cfg, "drain", host["host"])
    assert r.returncode == 0 and json.loads(r.stdout)["draining"], r.stderr
    elsewhere = resolve(url, "demo")
    assert elsewhere["host"] != host["host"]
    st = json.loads(ctl(cfg, "status", "--json").stdout)
    assert {h["host"]: h["draining"] for h in st["hosts"]}[host["host"]]
    t.join(60)
    assert out.get("done") and "error" not in out, out.get("error")
    n = len(out["frames"])
    assert n >= 6.0 * 25 and [f.number for f in out["frames"]] == list(range(n))   # it ended normally
    ctl(cfg, "drain", host["host"], "--undo")
    text = ctl(cfg, "status").stdout
    assert "hit ratio" in text and host["host"] in text and f"the router's listener: {url}" in text


def router_replicas(state: dict) -> list[psutil.Process]:
    """The router replica's process (Ray titles it ``ray::ServeReplica:lse:Router``) under the emulation."""
    out = []
    for p in psutil.Process(int(state["pid"])).children(recursive=True):
        try:
            if (p.cmdline() or [""])[0].startswith("ray::ServeReplica:lse:Router"):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_a_router_replica_killed_is_replaced_on_its_port_and_streams_go_on(cluster):
    """kill -9 of the router replica: Serve starts another (on the head node), its listener takes the
    same port, and until it has heard from the agents resolves fail with cluster_unavailable, never
    a wrong answer or a hang; a running stream is untouched."""
    url = cluster["url"]
    wait_ready(url)
    make_hot(url)
    t, out = streaming(url, 6.0)
    [old] = router_replicas(cluster["state"])
    old.kill()
    old.wait(10)
    t0, refused = time.monotonic(), []
    while True:
        try:
            where = resolve(url, AVATARS[3], timeout=3)
            break
        except ResolveError as e:
            assert e.code == "cluster_unavailable", e
            refused.append(e.message)
        assert time.monotonic() - t0 < 90, f"no resolve for 90 s after the router was killed: {refused[-3:]}"
        time.sleep(0.2)
    back_s = time.monotonic() - t0
    [new] = router_replicas(cluster["state"])
    assert new.pid != old.pid
    assert refused, "a resolve answered while no router ran"
    assert where["endpoint"] in {h["endpoint"] for h in cluster["state"]["hosts"]}
    assert all(resolve(url, name)["hot"] for name in AVATARS)           # the new router learns who holds what
    starting = sum("has not heard" in m for m in refused)              # answered by the new replica, counted
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    assert f'lse_cluster_resolves_total{{result="starting"}} {starting}' in text.splitlines(), (starting, refused[-3:])
    print(f"\nrouter replica replaced: resolves answered again {back_s:.1f} s after the kill "
          f"({len(refused)} refused meanwhile, e.g. {refused[-1]!r})")
    t.join(60)
    assert out.get("done") and "error" not in out, out.get("error")
    assert [f.number for f in out["frames"]] == list(range(len(out["frames"])))


def test_an_engine_killed_has_its_avatars_resolve_elsewhere_within_10_s(cluster):
    url = cluster["url"]
    wait_ready(url)
    victim = resolve(url, AVATARS[1])
    with Client(victim["endpoint"], timeout=30) as c:
        c.composite(AVATARS[1], AUDIO)
    hcfg = load_config(next(h["config"] for h in cluster["state"]["hosts"] if h["host"] == victim["host"]))
    from engine.supervisor.control import read_pid
    os.kill(read_pid(hcfg), signal.SIGKILL)
    t0 = time.monotonic()
    while (where := resolve(url, AVATARS[1]))["host"] == victim["host"]:
        assert time.monotonic() - t0 < 10, "the killed engine's avatar still resolves to it after 10 s"
        time.sleep(0.2)
    moved = time.monotonic() - t0
    with Client(where["endpoint"], timeout=30) as c:
        assert c.composite(AVATARS[1], AUDIO).frames
    print(f"\n{AVATARS[1]} resolved elsewhere {moved:.1f} s after its engine was killed")
    st = json.load(urllib.request.urlopen(url + "/status", timeout=5))
    down = {h["host"]: h for h in st["hosts"]}[victim["host"]]
    assert not down["healthy"] and down["error"]
    t1 = time.monotonic()
    with Client(victim["endpoint"], timeout=2) as c:                    # a client of the dead engine: a
        with pytest.raises(EngineError):                                # timeout, never a wait for ever
            c.health()
    assert time.monotonic() - t1 < 5
    r = subprocess.run([sys.executable, "-m", "engine.cli", "--config", str(hcfg.source), "start", "--detach"],
                       capture_output=True, text=True, timeout=300)         # back: the router sees it again
    assert r.returncode == 0, r.stdout + r.stderr
    wait_ready(url)


def test_a_host_leaves_and_joins_again_through_the_ray_address(cluster):
    """The commands of a real multi-host set-up (cluster leave/join --address) against the emulation's Ray."""
    url, cfg, state = cluster["url"], cluster["cfg"], cluster["state"]
    wait_ready(url)
    gone = state["hosts"][2]
    r = ctl(cfg, "leave", "--address", state["ray_address"], "--host", gone["host"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 15
    while gone["host"] in {h["host"] for h in json.loads(ctl(cfg, "status", "--json").stdout)["hosts"]}:
        assert time.monotonic() < deadline, "the router still lists the host that left"
        time.sleep(0.5)
    assert all(resolve(url, name)["host"] != gone["host"] for name in AVATARS)
    r = ctl(cfg, "join", "--address", state["ray_address"], "--host", gone["host"], "--endpoint", gone["endpoint"],
            timeout=120)
    assert r.returncode == 0 and "deployed" in r.stdout, r.stdout + r.stderr
    wait_ready(url)
    held = {name for name in AVATARS if holds(gone["endpoint"], name)}         # its engine kept serving
    st = json.loads(ctl(cfg, "status", "--json").stdout)
    assert held and held <= set({h["host"]: h for h in st["hosts"]}[gone["host"]]["hot"])


def test_with_ray_stopped_streams_go_on_and_resolve_fails_clearly_until_ray_is_back(cluster):
    url, cfg = cluster["url"], cluster["cfg"]
    wait_ready(url)
    t, out = streaming(url, 8.0)
    r = ctl(cfg, "stop", "--keep-engines")                             # Ray's head and Serve gone
    assert r.returncode == 0, r.stdout + r.stderr
    with pytest.raises(ResolveError) as e:
        resolve(url, "demo", timeout=3)
    assert e.value.code == "cluster_unavailable" and "Ray" in str(e.value)
    t.join(60)
    assert out.get("done") and "error" not in out, out.get("error")
    assert [f.number for f in out["frames"]] == list(range(len(out["frames"])))
    r = ctl(cfg, "start", "--emulate", "3", "--detach", "--http-port", str(cluster["port"]),
            "--resolve-port", str(cluster["rport"]))
    assert r.returncode == 0, r.stdout + r.stderr                       # the same engines, found running
    assert "already runs" in (Path(cluster["cfg"]).parent / "run" / "cluster" / "cluster.log").read_text()
    wait_ready(url)
    assert resolve(url, "demo")["endpoint"] in {h["endpoint"] for h in cluster["state"]["hosts"]}


def test_the_router_metrics(cluster):
    url = cluster["url"]
    wait_ready(url)
    resolve(url, AVATARS[2])
    with pytest.raises(ResolveError) as e:
        resolve(url, "no-such-avatar")
    assert e.value.code == "unknown_model"
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    series = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(series['lse_cluster_resolves_total{result="unknown_model"}']) >= 1
    assert float(series['lse_cluster_resolve_seconds_count']) >= 2
    assert sum(float(series[f'lse_cluster_host_up{{host="h{i}"}}']) for i in range(3)) == 3
