"""Many avatars of one architecture through a real engine with shared sessions: 200 distinct
networks served round-robin, every output its own network's, one session built; and the same 200
under a byte budget for 20 (engine/worker/shared.py, docs/architecture.md "Many avatars per GPU")."""
from __future__ import annotations

import os

import numpy as np
import psutil
import pytest

from engine import Client
from engine.cli.demo_avatars import make_demo
from engine.client.common import batch_buffers, batch_params, infer_result
from engine.runtime.shm import list_segments
from engine.worker.weights import prepare
from tests.conftest import start_engine, write_config
from tests.nets import make_avatar, run_own_session

AVATARS = 200
WINDOW = 6                                      # requests in flight at once (pipelined)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """200 avatars: two frames each (linked), each its own network of one architecture."""
    root = tmp_path_factory.mktemp("many")
    make_demo(root, frames=2)                                # "demo": another architecture, beside them
    small = small_frames(root / "small_src")                 # 320x256 frames: 200 avatars load quickly
    names = [f"a{i:03d}" for i in range(AVATARS)]
    nets = {n: make_avatar(root, n, 1000 + i, small) for i, n in enumerate(names)}
    rng = np.random.default_rng(5)
    image = rng.random((1, 6, 320, 320), np.float32)
    audio = rng.standard_normal((1, 32, 16, 16)).astype(np.float32)
    refs = {n: run_own_session(p, image, audio) for n, p in nets.items()}
    return root, names, nets, image, audio, refs


def small_frames(folder):
    """Two 320x256 frames cut from the demo avatar's around its face, and their crop rectangles."""
    from engine.cli.demo_avatars import RECTS_NAME, _frame_path, _write_png, _write_rects, crop_rect, draw_frame
    x0, y0 = 480, 256
    rects = []
    for i in range(2):
        _frame_path(folder, i).parent.mkdir(parents=True, exist_ok=True)
        _write_png(_frame_path(folder, i), draw_frame(i)[y0:y0 + 256, x0:x0 + 320].copy())
        x1, y1, x2, y2 = crop_rect(i)
        rects.append([x1 - x0, y1 - y0, x2 - x0, y2 - y0])
    _write_rects(folder / RECTS_NAME, rects)
    return folder


def serve_round_robin(c: Client, names, image, audio) -> dict[str, np.ndarray]:
    """One infer per avatar, WINDOW in flight at a time; every reply must be ok."""
    outs, waiting = {}, {}
    for n in [*names, *[None] * WINDOW]:
        if n is not None:
            waiting[c.submit("infer", batch_params(n, 1, 0, None), batch_buffers(audio, image))] = n
        if len(waiting) >= WINDOW or (n is None and waiting):
            rid = next(iter(waiting))
            out, result = infer_result(c.receive(rid))
            assert result["success"], result
            outs[waiting.pop(rid)] = out.copy()
    return outs


def start(root, tmp_path, budget: int | None):
    extra = "[capacity]\nbackground_bytes = 2147483648\n" + (f"network_bytes = {budget}\n" if budget else "")
    cfg = write_config(tmp_path / "engine.toml", root, tmp_path / "run", f"t{os.getpid()}sh{budget or 0}",
                       extra, gpu="shared_sessions = true")
    return start_engine(cfg)


def worker(c: Client) -> dict:
    (w,) = c.health()["gpu_workers"]
    return w


def test_200_avatars_round_robin_each_output_its_own_one_session_built(many, tmp_path):
    root, names, _, image, audio, refs = many
    eng = start(root, tmp_path, None)
    try:
        with Client(eng.endpoint, timeout=120) as c:
            outs = serve_round_robin(c, names, image, audio)
            w = worker(c)
            (listed,) = c.call("models").result["gpu_workers"]     # models reports what health does
            c.infer("demo", audio, image)                    # another architecture: its own session
            other = worker(c)
        for i, n in enumerate(names):
            assert float(np.abs(outs[n] - refs[n]).max()) <= 1e-5, n
            neighbour = names[(i + 1) % len(names)]
            assert float(np.abs(outs[n] - outs[neighbour]).max()) > 1e-3, (n, neighbour)
        r = w["resident"]
        assert (r["networks"], r["sessions_built"], r["own_sessions"], r["evictions"]) == (AVATARS, 1, 0, 0)
        (arch,) = w["architectures"].values()
        assert arch["networks"] == AVATARS and arch["first"] in names
        assert r["bytes"] == sum(w["networks"][n]["weight_bytes"] for n in names)
        assert (listed["resident"], listed["architectures"]) == (r, w["architectures"])
        assert other["resident"]["sessions_built"] == 2
        assert sorted(a["networks"] for a in other["architectures"].values()) == [1, AVATARS]
    finally:
        eng.stop()
        assert list_segments(eng.prefix) == []


def test_a_budget_for_20_of_200_evicts_by_bytes_and_every_output_stays_right(many, tmp_path):
    root, names, nets, image, audio, refs = many
    size = prepare(nets[names[0]], tmp_path / "probe").weight_bytes     # as the worker counts it
    budget = max(20 * size + size // 2, 1 << 20)
    eng = start(root, tmp_path, budget)
    try:
        with Client(eng.endpoint, timeout=120) as c:
            rss = []
            for _ in range(2):
                outs = serve_round_robin(c, names, image, audio)
                for n in names:
                    assert float(np.abs(outs[n] - refs[n]).max()) <= 1e-5, n
                w = worker(c)
                r = w["resident"]
                assert r["bytes"] <= budget and r["networks"] <= budget // size
                rss.append(psutil.Process(eng.pid_of("gpu")).memory_info().rss)
            assert r["loads"] >= 2 * AVATARS - 20 and r["evictions"] >= r["loads"] - budget // size
            assert r["sessions_built"] == 1 and r["own_sessions"] == 0
        # nothing leaks: a second round of 200 loads and evictions leaves the worker about where the first did
        assert rss[1] - rss[0] < 40 * size + (16 << 20), rss
    finally:
        eng.stop()
        assert list_segments(eng.prefix) == []
