"""A real engine (supervisor, front, GPU worker, two compositors) serving the demo avatar."""
from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest
import simplejpeg
import zmq

from engine.client import Client, EngineError
from engine.kernels.image import frame_index
from engine.runtime.shm import list_segments
from tests.conftest import kill

pytestmark = pytest.mark.integration

B = 6


def loud(batch: int) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((batch, 32, 16, 16)).astype(np.float32)


def silent(batch: int) -> np.ndarray:
    return np.zeros((batch, 32, 16, 16), np.float32)


def mouth_box(models_root, k: int) -> tuple[int, int, int, int]:
    """The mouth area in full-frame pixels for avatar frame k (the demo mouth sits at y~185 of 320)."""
    x1, y1, x2, y2 = json.loads((models_root / "demo" / "crop_rects.json").read_text())[k]
    s = (x2 - x1) / 320
    return int(x1 + 110 * s), int(y1 + 165 * s), int(x1 + 210 * s), int(y1 + 225 * s)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def test_two_concurrent_clients_get_valid_frames(shared_engine, models_root):
    results: dict[str, object] = {}

    def run(name: str, audio: np.ndarray, start: int) -> None:
        with Client(shared_engine.endpoint, timeout=120) as c:
            results[name] = [c.composite("demo", audio, start_frame=start) for _ in range(2)]

    threads = [threading.Thread(target=run, args=("loud", loud(B), 5)),
               threading.Thread(target=run, args=("silent", silent(B), 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert set(results) == {"loud", "silent"}
    n = 12
    for name, batches in results.items():
        for r in batches:
            assert len(r.frames) == B
            info = r.info
            assert info["width"] == 1280 and info["height"] == 720 and info["gpu_id"] == -1
            assert info["frame_indices"] == [frame_index(5 + i, n) for i in range(B)]
            for key in ("inference_time_ms", "composite_time_ms", "total_time_ms"):
                assert info[key] > 0
            assert info["total_time_ms"] >= info["composite_time_ms"]
    # silent audio: the demo network returns the reference face, so the frame is the background
    for i, (jl, js) in enumerate(zip(results["loud"][0].frames, results["silent"][0].frames)):
        k = frame_index(5 + i, n)
        bg = cv2.imread(str(models_root / "demo" / "frames" / f"frame_{k:04d}.png"))
        fl = simplejpeg.decode_jpeg(jl, colorspace="BGR")
        fs = simplejpeg.decode_jpeg(js, colorspace="BGR")
        assert fl.shape == fs.shape == (720, 1280, 3)
        assert psnr(fs, bg) > 30
        x1, y1, x2, y2 = mouth_box(models_root, k)
        # loud audio opens the mouth: the mouth area is much darker than in the silent frame
        assert fl[y1:y2, x1:x2].mean() < fs[y1:y2, x1:x2].mean() - 15
        # and nothing changes far from the face
        assert psnr(fl[:, :200], bg[:, :200]) > 30


def test_infer_returns_raw_network_output(shared_engine):
    with Client(shared_engine.endpoint) as c:
        out, info = c.infer("demo", loud(3), start_frame=0)
        out0, _ = c.infer("demo", silent(3), start_frame=0)
    assert out.shape == (3, 3, 320, 320) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert np.abs(out - out0).max() > 0.3          # the audio changed the mouth
    assert info["inference_time_ms"] > 0


def test_client_supplied_visual_frames(shared_engine):
    visual = np.zeros((2, 6, 320, 320), np.float32)
    visual[:, :3] = 0.5
    with Client(shared_engine.endpoint) as c:
        out, _ = c.infer("demo", silent(2), visual_frames=visual)
        r = c.composite("demo", silent(2), visual_frames=visual, start_frame=3)
    np.testing.assert_allclose(out, 0.5, atol=1e-6)      # silent demo network = reference face
    assert len(r.frames) == 2


def _raw(endpoint: str, *frames: bytes) -> dict:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send_multipart([b"", *frames])
        assert s.poll(30000), "no reply"
        return json.loads(s.recv_multipart()[1])
    finally:
        s.close(0)


def _hdr(method: str = "composite", params: dict | None = None, buffers: list | None = None, **kw) -> bytes:
    h = {"v": 1, "id": 9, "method": method, "params": params or {}, "buffers": buffers or []}
    h.update(kw)
    return json.dumps(h).encode()


AUDIO = {"name": "audio_features", "dtype": "float32", "shape": [2, 32, 16, 16]}


@pytest.mark.parametrize("frames, code, word", [
    ([b"{not json"], "bad_request", "JSON"),
    ([b'{"v": 1, "id": 9, "meth'], "bad_request", "JSON"),
    ([_hdr(v=7)], "unsupported_version", "version"),
    ([_hdr("teleport")], "unknown_method", "teleport"),
    ([_hdr(params={"model": "nobody", "batch_size": 2}, buffers=[AUDIO]), bytes(2 * 32768)], "unknown_model",
     "nobody"),
    ([_hdr(params={"model": "demo", "batch_size": 0}, buffers=[AUDIO]), bytes(2 * 32768)], "bad_request",
     "batch_size"),
    ([_hdr(params={"model": "demo", "batch_size": 51}, buffers=[AUDIO]), bytes(2 * 32768)], "bad_request",
     "batch_size"),
    ([_hdr(params={"model": "demo", "batch_size": 2}, buffers=[AUDIO]), bytes(100)], "bad_payload",
     "audio_features"),
    ([_hdr(params={"model": "demo", "batch_size": 3}, buffers=[AUDIO]), bytes(2 * 32768)], "bad_payload",
     "[3, 32, 16, 16]"),
    ([_hdr(params={"model": "demo", "batch_size": 2},
           buffers=[dict(AUDIO, dtype="int16")]), bytes(2 * 16384)], "bad_payload", "float32"),
    ([_hdr(params={"model": "demo", "batch_size": 2}, buffers=[AUDIO])], "bad_payload", "binary frames"),
    ([_hdr(params={"model": "demo", "batch_size": 2})], "bad_payload", "audio_features"),
])
def test_bad_input_gets_a_named_error_and_the_engine_serves_on(shared_engine, frames, code, word):
    reply = _raw(shared_engine.endpoint, *frames)
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == code, reply
    assert word in reply["error"]["message"], reply
    with Client(shared_engine.endpoint) as c:
        assert len(c.composite("demo", loud(1)).frames) == 1


HOSTILE = [
    # a model name over 255 bytes used to be an OSError inside the front: internal + a traceback per request
    ([_hdr(params={"model": "x" * 300, "batch_size": 2}, buffers=[AUDIO]), bytes(2 * 32768)], "unknown_model",
     "invalid avatar name"),
    ([_hdr("load", params={"model": "é" * 200})], "unknown_model", "invalid avatar name"),
    ([_hdr("stream_open", params={"model": "a\u0000b"})], "unknown_model", "invalid avatar name"),
    # a dtype that is not a string used to be internal, with the reply's id lost
    ([_hdr(params={"model": "demo", "batch_size": 2}, buffers=[dict(AUDIO, dtype={})]), bytes(2 * 32768)],
     "bad_payload", "dtype"),
    ([_hdr(params={"model": "demo", "batch_size": 2}, buffers=[dict(AUDIO, dtype=["float32"])]),
      bytes(2 * 32768)], "bad_payload", "dtype"),
    # start_frame near 2^63 used to give wrong frame_indices
    ([_hdr(params={"model": "demo", "batch_size": 2, "start_frame": 2**63 - 2}, buffers=[AUDIO]),
      bytes(2 * 32768)], "bad_request", "start_frame"),
    ([_hdr("stream_open", params={"model": "demo", "start_frame": 2**62})], "bad_request", "start_frame"),
    ([_hdr(params={"model": "demo", "batch_size": 2.5}, buffers=[AUDIO]), bytes(2 * 32768)], "bad_request",
     "batch_size"),
]


@pytest.mark.parametrize("frames, code, word", HOSTILE)
def test_hostile_input_gets_its_code_keeps_its_id_and_logs_no_traceback(shared_engine, frames, code, word):
    before = shared_engine.log.stat().st_size
    reply = _raw(shared_engine.endpoint, *frames)
    assert reply["id"] == 9 and reply["status"] == "error", reply
    assert reply["error"]["code"] == code and word in reply["error"]["message"], reply
    assert len(reply["error"]["message"]) < 400
    time.sleep(0.2)
    with open(shared_engine.log, "rb") as fh:
        fh.seek(before)
        logged = fh.read()
    assert b"Traceback" not in logged and len(logged) < 2000


def test_integral_numbers_are_integers_and_huge_start_frames_stay_exact(shared_engine):
    big = 2**53 - 1 - 2
    reply = _raw(shared_engine.endpoint, _hdr(params={"model": "demo", "batch_size": 2.0, "start_frame": float(1000)},
                                              buffers=[AUDIO], v=1.0), bytes(2 * 32768))
    assert reply["status"] == "ok", reply
    assert reply["result"]["start_frame"] == 1000 and reply["result"]["batch_size"] == 2
    reply = _raw(shared_engine.endpoint, _hdr(params={"model": "demo", "batch_size": 2, "start_frame": big},
                                              buffers=[AUDIO]), bytes(2 * 32768))
    assert reply["status"] == "ok", reply
    assert reply["result"]["frame_indices"] == [frame_index(big + i, 12) for i in range(2)]


def test_req_socket_client(shared_engine):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(shared_engine.endpoint)
    try:
        s.send(_hdr("health", id="abc"))
        assert s.poll(10000)
        reply = json.loads(s.recv())
    finally:
        s.close(0)
    assert reply["id"] == "abc" and reply["status"] == "ok" and reply["result"]["healthy"] is True
    assert reply["result"]["provider"] == ["CPUExecutionProvider"]


def test_pipelined_requests_on_one_connection(shared_engine):
    with Client(shared_engine.endpoint) as c:
        ids = [c.submit("composite", {"model": "demo", "batch_size": 2, "start_frame": i},
                        [("audio_features", loud(2))]) for i in range(5)]
        replies = {i: c.receive(i) for i in reversed(ids)}
    assert all(r.ok and len(r.buffers) == 2 for r in replies.values())
    assert [replies[i].result["start_frame"] for i in ids] == list(range(5))


def test_client_gone_mid_request_leaks_nothing(shared_engine):
    ctx = zmq.Context.instance()
    for _ in range(3):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 1000)
        s.connect(shared_engine.endpoint)
        from engine.protocol import encode_request
        s.send_multipart([b"", *encode_request(1, "composite", {"model": "demo", "batch_size": 8},
                                               [("audio_features", loud(8))])])
        s.close()
    time.sleep(0.5)
    with Client(shared_engine.endpoint) as c:
        assert len(c.composite("demo", loud(2)).frames) == 2
        deadline = time.monotonic() + 20
        while True:
            h = c.health()
            w = h["gpu_workers"][0]
            if (w["inflight"], w["free_slots"], h["pending"]) == (0, 3, 0):
                break
            assert time.monotonic() < deadline, h
            time.sleep(0.2)
        demo = next(m for m in c.models() if m["name"] == "demo")
    assert demo["loaded"] and demo["requests"] >= 1


def test_models_load_unload(shared_engine):
    with Client(shared_engine.endpoint) as c:
        names = {m["name"]: m for m in c.models()}
        assert "demo" in names
        info = c.load("demo")
        assert info["loaded"] and info["frames"] == 12 and info["layout"] == "splice"
        # the avatar's object as models gives it (7.5), precision and the workers' networks included
        listed = next(m for m in c.models() if m["name"] == "demo")
        assert info["precision"] == listed["precision"] == "fp32" and isinstance(info["networks"], list)
        assert set(info) == set(listed)
        mem = info["memory_bytes"]
        # spliced form: background JPEGs + face regions, <= 0.25 MB per 1280x720 frame (decoded: 2.76 MB)
        assert mem["backgrounds"] == mem["parts"]["total"] <= 12 * 250_000
        assert mem["parts"]["jpeg"] > 12 * 20_000 and mem["parts"]["regions"] > 12 * 100_000
        assert c.unload("demo")["unloaded"] is True
        assert not next(m for m in c.models() if m["name"] == "demo")["loaded"]
        assert not [s for s in list_segments(shared_engine.prefix) if "_av_" in s]
        with pytest.raises(EngineError, match="unknown_model"):
            c.load("nobody")
        # served again after an unload: loaded on first use
        assert len(c.composite("demo", loud(1)).frames) == 1
        # models reports per worker what health does: its resident networks, bytes, sessions, loads, evictions
        (mw,) = c.call("models").result["gpu_workers"]
        (hw,) = c.health()["gpu_workers"]
        assert (mw["idx"], mw["gpu_id"]) == (0, -1)
        assert mw["resident"] == hw["resident"] and mw["architectures"] == hw["architectures"]
        r = mw["resident"]
        assert r["networks"] == len(hw["networks"]) >= 1 and r["loads"] >= r["networks"]
        assert r["bytes"] == sum(n["weight_bytes"] for n in hw["networks"].values()) > 0
        assert r["own_sessions"] == 1 and not r["shared_sessions"] and mw["architectures"] == {}


def _wait_restarted(eng, role: str, old_pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = eng.status()
        p = next(p for p in st["processes"] if p["role"] == role and p["idx"] == 0)
        if p["pid"] not in (None, old_pid) and p["state"] == "ready" and p["restarts"] >= 1:
            return
        time.sleep(0.2)
    raise AssertionError(f"{role} not replaced: {eng.status()}")


@pytest.mark.parametrize("role", ["gpu", "compositor"])
def test_killed_worker_is_replaced_and_serving_resumes(engine_factory, role):
    eng = engine_factory()
    with Client(eng.endpoint) as c:
        assert len(c.composite("demo", loud(4)).frames) == 4
        pid = eng.pid_of(role)
        kill(pid)
        _wait_restarted(eng, role, pid)
        r = c.composite("demo", loud(4), start_frame=2)
        assert len(r.frames) == 4
        h = c.health()
    workers = h["gpu_workers"] if role == "gpu" else h["compositors"]
    assert workers[0]["restarts"] == 1 and workers[0]["state"] == "ready"


def test_stop_leaves_no_shared_memory(engine_factory):
    eng = engine_factory()
    with Client(eng.endpoint) as c:
        c.composite("demo", loud(2))
    assert any("_av_" in s for s in list_segments(eng.prefix))
    assert eng.stop() == 0
    assert list_segments(eng.prefix) == []
    assert not (eng.cfg.run_path / "engine.pid").exists()


def test_supervisor_kill9_then_next_start_cleans(engine_factory):
    from tests.conftest import start_engine
    eng = engine_factory()
    with Client(eng.endpoint) as c:
        c.composite("demo", loud(2))
    children = [p["pid"] for p in eng.status()["processes"] if p["role"] != "supervisor"]
    kill(eng.proc.pid)
    eng.proc.wait(10)
    import psutil
    deadline = time.monotonic() + 20
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in children):
        assert time.monotonic() < deadline, "children outlived the supervisor"
        time.sleep(0.2)
    assert list_segments(eng.prefix), "the killed supervisor's rings should still be there"
    again = start_engine(eng.cfg.source and __import__("pathlib").Path(eng.cfg.source))
    try:
        with Client(again.endpoint) as c:
            assert len(c.composite("demo", loud(2)).frames) == 2
    finally:
        assert again.stop() == 0
    assert list_segments(eng.prefix) == []


def test_asyncio_client_concurrent_requests(shared_engine):
    import asyncio

    from engine.client import AsyncClient

    async def main():
        c = AsyncClient(shared_engine.endpoint)
        try:
            results = await asyncio.gather(*(c.composite("demo", loud(2), start_frame=2 * i) for i in range(4)),
                                           c.health())
            with pytest.raises(EngineError, match="unknown_model"):
                await c.composite("nobody", loud(1))
            out, info = await c.infer("demo", loud(1), start_frame=None or 0)
            return results, out, info
        finally:
            c.close()
    results, out, info = asyncio.run(main())
    assert [r.info["start_frame"] for r in results[:4]] == [0, 2, 4, 6]
    assert all(len(r.frames) == 2 for r in results[:4])
    assert results[4]["healthy"] is True
    assert out.shape == (1, 3, 320, 320) and info["frame_indices"] == [0]


def test_full_and_splice_encoders_give_the_same_pixels(shared_engine, engine_factory):
    """output.encoder = "full" (today's path) and "splice" (the default): the same frames decoded,
    the spliced ones at most 3% larger (restart markers)."""
    full = engine_factory('[output]\nencoder = "full"\n')
    audio = loud(6)
    with Client(shared_engine.endpoint) as c:
        spliced = c.composite("demo", audio, start_frame=4).frames
    with Client(full.endpoint) as c:
        whole = c.composite("demo", audio, start_frame=4).frames
        assert next(m for m in c.models() if m["name"] == "demo")["layout"] == "decoded"
    for a, b in zip(spliced, whole):
        assert np.array_equal(simplejpeg.decode_jpeg(a), simplejpeg.decode_jpeg(b))
        assert len(b) < len(a) <= 1.03 * len(b)


def test_optional_params_may_be_null(shared_engine):
    reply = _raw(shared_engine.endpoint, _hdr(params={"model": "demo", "batch_size": 1, "start_frame": None,
                                                      "wrap": None}, buffers=[dict(AUDIO, shape=[1, 32, 16, 16])]),
                 bytes(32768))
    assert reply["status"] == "ok", reply
    assert reply["result"]["start_frame"] == 0


def test_slow_reader_gets_its_own_frames_while_others_reuse_the_slots(engine_factory):
    """A reply a client has not read yet holds no ring slot (its JPEGs were copied out of it): others
    reuse the slots meanwhile, and the slow reader still gets exactly its own frames."""
    eng = engine_factory("[output]\njpeg_quality = 100\nchroma_subsampling = \"444\"\n")   # JPEGs > 64 KiB
    audio = loud(50)
    with Client(eng.endpoint) as ref:
        expected = ref.composite("demo", audio, start_frame=3).frames
    assert min(len(f) for f in expected) > 65536
    slow = Client(eng.endpoint, sockopts={zmq.RCVBUF: 4096, zmq.RCVHWM: 1})    # a tiny receive buffer
    # two replies: the first fills the client's queue, the second waits on the engine's side
    rids = [slow.submit("composite", {"model": "demo", "batch_size": 50, "start_frame": 3},
                        [("audio_features", audio)]) for _ in range(2)]
    time.sleep(1.5)                                   # it does not read; meanwhile the slots are reused
    with Client(eng.endpoint) as busy:
        for i in range(6):
            busy.composite("demo", silent(50), start_frame=i)
    for rid in rids:
        reply = slow.receive(rid)
        got = [bytes(f.buffer if hasattr(f, "buffer") else f) for _, f in reply.buffers]
        assert got == expected
    slow.close()
