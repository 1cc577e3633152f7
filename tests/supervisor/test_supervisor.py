"""Supervision of an engine that has run a while: a front death at any age, restart counts, the log."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.audio.speech import speech_pcm
from engine.client import Client, EngineError
from engine.runtime.shm import list_segments
from tests.conftest import kill

pytestmark = pytest.mark.integration


def _wait_ready_again(eng, old_pid: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert eng.proc.poll() is None, "the engine stopped:\n" + eng.log.read_text()[-3000:]
        st = eng.status()
        front = next(p for p in st["processes"] if p["role"] == "front")
        if st["ready"] and front["pid"] != old_pid and all(p["state"] == "ready" for p in st["processes"]):
            return st
        time.sleep(0.2)
    raise AssertionError(f"not ready again: {eng.status()}")


def test_front_killed_after_the_ready_timeout_the_engine_serves_again(engine_factory):
    """Issue: the boot deadline was never reset, so a front death after ready_timeout_s stopped
    the whole engine. In-flight requests and streams fail at once on the client (disconnected)."""
    eng = engine_factory("[supervision]\nready_timeout_s = 10\n")
    audio = np.random.default_rng(1).standard_normal((24, 32, 16, 16)).astype(np.float32)
    with Client(eng.endpoint, timeout=30) as c:
        c.composite("demo", audio)
        time.sleep(10.5)                                        # older than ready_timeout_s
        s = c.open_stream("demo")
        s.push(speech_pcm(10.0, seed=3), end=True)
        ids = [c.submit("composite", {"model": "demo", "batch_size": 24}, [("audio_features", audio)])
               for _ in range(6)]
        before = eng.status()
        front = next(p for p in before["processes"] if p["role"] == "front")
        kill(front["pid"])
        outcomes = []
        for rid in ids:                                         # each one answered or failed, none hangs
            try:
                outcomes.append("ok" if c.receive(rid, timeout=20).ok else "error")
            except EngineError as e:
                outcomes.append(e.code)
        assert set(outcomes) <= {"ok", "disconnected"} and "disconnected" in outcomes, outcomes
        with pytest.raises(EngineError) as err:
            list(s.frames(timeout=20))
        assert err.value.code == "disconnected"
        after = _wait_ready_again(eng, front["pid"])
        assert len(c.composite("demo", audio).frames) == 24       # the same client object serves on
    # every replaced process counts a restart (all of them were replaced), and no segment leaked
    restarts = {(p["role"], p["idx"]): p["restarts"] for p in after["processes"] if p["role"] != "supervisor"}
    assert set(restarts.values()) == {1}, restarts
    pids_before = {p["pid"] for p in before["processes"] if p["role"] != "supervisor"}
    assert not pids_before & {p["pid"] for p in after["processes"]}
    avatars = [s for s in list_segments(eng.prefix) if "_av_" in s]
    assert len(avatars) == 1                                    # the new front's copy of demo, no leftover


def test_the_log_file_stays_under_its_bound(engine_factory, tmp_path):
    """A hostile client can make the engine log; the log is rotated, never larger than
    server.log_max_bytes per file and server.log_backups + 1 files."""
    log = tmp_path / "rotated" / "engine.log"
    eng = engine_factory(server=f'log_file = "{log}"\nlog_max_bytes = 65536\nlog_backups = 2\n')
    # at least 6 s, and on until the log has rotated twice (a busy machine logs less in 6 s), at most 60
    start = time.monotonic()

    def more() -> bool:
        spent = time.monotonic() - start
        return spent < 6 or (spent < 60 and not (log.parent / "engine.log.2").exists())

    def hammer() -> None:
        with Client(eng.endpoint, timeout=30) as c:
            while more():
                s = c.open_stream("demo")
                s.close()                                           # two INFO lines per round
                try:
                    c.composite("x" * 100, np.zeros((1, 32, 16, 16), np.float32))
                except EngineError:
                    pass

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    files = sorted(log.parent.glob("engine.log*"))
    assert [f.name for f in files] == ["engine.log", "engine.log.1", "engine.log.2"]
    assert all(f.stat().st_size <= 65536 for f in files)
    text = files[0].read_text()
    assert "stream" in text and "Traceback" not in "".join(f.read_text() for f in files)
    with Client(eng.endpoint) as c:
        assert c.health()["healthy"]
