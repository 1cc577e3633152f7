"""The GPU worker on real engines (CPU provider): fixed shapes under random streams, loads that
never stall serving, fp16 avatars, a network that cannot load."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from engine.audio.speech import speech_like_features, speech_pcm
from engine.cli.bench import run_stream_bench
from engine.cli.demo_avatars import make_demo
from engine.cli.demo_networks import build_demo_network
from engine.client import Client, EngineError

pytestmark = pytest.mark.integration

BUCKETS = [1, 2, 4, 8, 16, 32, 50]


def add_avatar(models_root: Path, name: str, network: onnx.ModelProto | None = None, tiny: bool = False) -> None:
    """Avatar ``name`` under ``models_root``: the demo avatar's frames and rectangles with ``network``
    (default: the demo network); ``tiny``: two small frames of its own instead (decoded in no time,
    so that only the network's load is measured)."""
    import json

    import cv2
    d = models_root / name
    if d.exists():
        shutil.rmtree(d)
    (d / "checkpoint").mkdir(parents=True)
    if tiny:
        (d / "frames").mkdir()
        for i in range(2):
            cv2.imwrite(str(d / "frames" / f"frame_{i:04d}.png"), np.full((96, 96, 3), 60 + 80 * i, np.uint8))
        (d / "crop_rects.json").write_text(json.dumps([[16, 16, 80, 80]] * 2))
    else:
        (d / "frames").symlink_to(models_root / "demo" / "frames")
        shutil.copy(models_root / "demo" / "crop_rects.json", d / "crop_rects.json")
    onnx.save(network or build_demo_network(), str(d / "checkpoint" / "model_best.onnx"))


def slow_network(chain: int) -> onnx.ModelProto:
    """The demo network plus a chain of ``chain`` scalar Adds whose result is multiplied by zero:
    the same output, but a session that takes seconds to create (graph partitioning and planning
    of every node), the stand-in for a large network's load and warm-up."""
    m = build_demo_network()
    g = m.graph
    for n in g.node:
        n.output[:] = ["demo_out" if o == "output" else o for o in n.output]
    g.initializer.extend([numpy_helper.from_array(np.array(1e-6, np.float32), "slow/c"),
                          numpy_helper.from_array(np.array(0.0, np.float32), "slow/zero")])
    prev = "slow/s0"
    g.node.append(helper.make_node("ReduceMean", ["audio"], [prev], axes=[1, 2, 3], keepdims=1))
    for i in range(chain):
        g.node.append(helper.make_node("Add", [prev, "slow/c"], [f"slow/s{i + 1}"]))
        prev = f"slow/s{i + 1}"
    g.node.append(helper.make_node("Mul", [prev, "slow/zero"], ["slow/z"]))
    g.node.append(helper.make_node("Add", ["demo_out", "slow/z"], ["output"]))
    return m


def worker_stats(c: Client) -> list[dict]:
    return c.health()["gpu_workers"]


def wait_loaded(c: Client, name: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in worker_stats(c):
            if name in w["models"]:
                return w
        time.sleep(0.05)
    raise AssertionError(f"network {name} not loaded within {timeout} s")


# -- 1. no cold shape on a live path -------------------------------------------------------------
@pytest.mark.parametrize("buckets", [BUCKETS, "off"])
def test_random_streams_on_two_avatars_run_only_warmed_up_shapes(engine_factory, tmp_path, buckets):
    """With buckets, 0 cold runs; the same load without them ("off", exact sizes) does present
    shapes never seen before, which is what the buckets are for."""
    second = make_demo(tmp_path / "second", frames=8)          # another avatar: 8 frames, its own network file
    setting = f'"{buckets}"' if isinstance(buckets, str) else str(buckets)
    eng = engine_factory(f'[models.demo2]\npath = "{second}"\n',
                         gpu=f"slots_per_device = 2\nbatch_buckets = {setting}")
    rng = np.random.default_rng(2027)
    plans = []
    for k in range(16):                         # up to 16 at once: start, pause, stop at random
        plans.append({"avatar": ["demo", "demo2"][int(rng.integers(2))], "start": float(rng.uniform(0, 6)),
                      "seconds": float(rng.uniform(0.4, 3.0)), "realtime": bool(rng.integers(2)),
                      "chunks": int(rng.integers(1, 12)), "pause": float(rng.uniform(0, 0.8)),
                      "stop_early": bool(rng.random() < 0.3), "seed": k})
    got: dict[int, tuple[int, int, bool]] = {}
    errors: list[str] = []

    def speak(k: int, p: dict) -> None:
        time.sleep(p["start"])
        pcm = speech_pcm(p["seconds"], seed=p["seed"])
        try:
            with Client(eng.endpoint, timeout=60) as c:
                s = c.open_stream(p["avatar"], realtime=p["realtime"])
                parts = np.array_split(pcm, p["chunks"])
                frames = 0
                for i, part in enumerate(parts):
                    s.push(part)
                    frames += len(s.poll(0.0))
                    if i == len(parts) // 2:
                        time.sleep(p["pause"])          # the speaker pauses: the stream runs dry
                    if p["stop_early"] and i == len(parts) // 2:
                        frames += len(s.poll(0.3))
                        s.close()
                        got[k] = (frames, len(pcm), True)
                        return
                s.end()
                frames += sum(1 for _ in s.frames(60))
                got[k] = (frames, len(pcm), False)
        except Exception as e:  # noqa: BLE001
            errors.append(f"stream {k}: {e!r}")

    threads = [threading.Thread(target=speak, args=(k, p)) for k, p in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for k, (frames, samples, stopped) in got.items():
        if not stopped:
            assert frames == -(-samples // 640), f"stream {k}: {frames} frames"
    with Client(eng.endpoint) as c:
        h = c.health()
    print({w["idx"]: (w["batches"], w["frames"], w["models"]) for w in h["gpu_workers"]},
          sum(f for f, _, _ in got.values()), "frames", h["cold_runs"], "cold runs")
    assert sum(w["batches"] for w in h["gpu_workers"]) >= 10   # many sizes (fewer, larger batches on a busy machine)
    if buckets == "off":
        assert h["cold_runs"] > 10
        return
    assert h["cold_runs"] == 0
    networks = set()
    for w in h["gpu_workers"]:
        assert w["cold_runs"] == 0 and w["cold_shapes"] == []
        for key, sizes in w["shapes"].items():
            if key.startswith("encoder:"):
                assert sizes and sizes[0] == 16 and all(b == 16 * 2 ** i for i, b in enumerate(sizes)), sizes
            else:
                assert sizes == BUCKETS, (key, sizes)       # warmed up at load, nothing else ever run
                networks.add(key)
    assert networks == {"demo", "demo2"}


# -- 2. loading never stalls serving -------------------------------------------------------------
@pytest.mark.realtime
def test_a_slow_load_does_not_delay_a_live_stream_on_another_avatar(engine_factory, models_root):
    """Two streams open on an avatar whose network takes seconds to load (their jobs wait for it)
    while a real-time stream runs on a loaded avatar: that stream keeps 25 frames/s and its p99
    latency within 100 ms of the floor; the new streams get every frame once the network is in."""
    add_avatar(models_root, "slowload", slow_network(70_000), tiny=True)   # ~3 s to load here
    try:
        eng = engine_factory("""
[models.demo]
preload = true
""")
        box: dict = {}
        got: dict[int, list] = {}
        opened = threading.Barrier(3)
        go = threading.Event()
        t0 = [0.0]

        def speak(k: int) -> None:
            with Client(eng.endpoint, timeout=120) as c:
                # opened first: the front decodes the avatar's frames now (its own cost, not the load's)
                s = c.open_stream("slowload", realtime=False)
                opened.wait(60)
                go.wait(60)
                s.push(speech_pcm(2.0, seed=k), end=True)       # its jobs wait while the network loads
                got[k] = [(time.monotonic() - t0[0], f.number) for f in s.frames(120)]
        newcomers = [threading.Thread(target=speak, args=(k,)) for k in range(2)]
        for n in newcomers:
            n.start()
        opened.wait(60)
        live_s = 12.0
        t = threading.Thread(target=lambda: box.update(r=run_stream_bench(eng.endpoint, "demo", 1, seconds=live_s)))
        t.start()
        time.sleep(1.5)                                          # the live stream is running
        t0[0] = time.monotonic()
        go.set()
        for n in newcomers:
            n.join(120)
        t.join(60)
        with Client(eng.endpoint) as c:
            w = wait_loaded(c, "slowload")
        res = box["r"]
        net = w["networks"]["slowload"]
        first = min(frames[0][0] for frames in got.values())
        # the live stream's frames that arrived while the network loaded (from the newcomers' audio
        # to their first frame); afterwards their jobs share the worker, which is another matter
        start, end = t0[0], t0[0] + first
        during = [(t, lat) for t, lat in zip(res.arrivals, res.latencies_ms) if start <= t <= end]
        rate = (len(during) - 1) / (during[-1][0] - during[0][0])
        p99 = float(np.percentile([lat for _, lat in during], 99))
        print(f"slow network loaded in {net['load_ms']:.0f} ms, first frame of its streams {first:.1f} s after "
              f"their audio; meanwhile the live stream: {len(during)} frames at {rate:.2f} frames/s, latency p99 "
              f"{p99:.0f} ms (floor {res.floor_ms:.0f} ms); over the whole stream: {res.summary()}")
        assert not res.errors, res.errors
        assert [len(f) for f in got.values()] == [50, 50]        # every frame, once loaded
        assert net["load_ms"] > 2000, net                       # it really was slow ...
        assert first > 2.0 and 1.5 + first < live_s - 2, first  # ... and loaded while the live stream ran
        assert len(during) >= 25 * 2
        assert rate >= 24.5
        assert p99 <= res.floor_ms + 100
        assert sum(res.frames) == 25 * live_s
    finally:
        shutil.rmtree(models_root / "slowload")


def test_a_network_that_cannot_load_fails_its_requests_and_others_serve(engine_factory, models_root):
    bad = build_demo_network()
    bad.graph.node.append(helper.make_node("NoSuchOp", ["output"], ["never"], domain="com.example"))
    bad.opset_import.append(helper.make_opsetid("com.example", 1))
    add_avatar(models_root, "badnet", bad)
    try:
        eng = engine_factory()
        with Client(eng.endpoint, timeout=60) as c:
            with pytest.raises(EngineError) as info:
                c.composite("badnet", speech_like_features(2, 0))
            assert info.value.code == "model_error" and "badnet" in info.value.message
            assert len(c.composite("demo", speech_like_features(3, 0)).frames) == 3
            assert all("badnet" not in w["models"] and "badnet" not in w["loading"] for w in worker_stats(c))
    finally:
        shutil.rmtree(models_root / "badnet")


# -- 3. fp16 ---------------------------------------------------------------------------------------
def test_fp16_avatar_serves_close_to_fp32_and_models_reports_the_error(engine_factory, models_root):
    add_avatar(models_root, "demo32")                           # the same network and frames, in fp32
    try:
        eng = engine_factory('[models.demo]\nprecision = "fp16"\n')
        audio = speech_like_features(6, 0)
        with Client(eng.endpoint, timeout=120) as c:
            half, _ = c.infer("demo", audio, start_frame=3)
            full, _ = c.infer("demo32", audio, start_frame=3)
            info = {m["name"]: m for m in c.models()}
        diff = np.abs(half.astype(np.float64) - full)
        assert 0 < diff.max() < 0.01 and diff.mean() < 1e-3      # fp16 for real, and close to fp32
        assert info["demo"]["precision"] == "fp16" and info["demo32"]["precision"] == "fp32"
        (net,) = info["demo"]["networks"]
        assert net["precision"] == "fp16" and "fp16_error" not in info["demo32"]["networks"][0]
        err = net["fp16_error"]
        assert err["frames"] == 8 and err["provider"] == "CPUExecutionProvider"
        assert 0 < err["mean_abs_diff"] <= err["max_abs_diff"] < 0.01
        cache = Path(err["file"])
        assert cache.parent == eng.cfg.cache_dir / "fp16" and cache.is_file()
    finally:
        shutil.rmtree(models_root / "demo32")
