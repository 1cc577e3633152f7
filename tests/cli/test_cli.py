"""engine-ctl against a real engine, as a user runs it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from engine.runtime.shm import list_segments
from tests.conftest import write_config

pytestmark = pytest.mark.integration


def ctl(eng, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", "--config", eng.cfg.source, *args],
                          capture_output=True, text=True, timeout=timeout)


def test_status_health_models(shared_engine):
    r = ctl(shared_engine, "status")
    assert r.returncode == 0, r.stderr
    for role in ("supervisor", "front", "gpu", "compositor"):
        assert role in r.stdout
    assert "ready" in r.stdout and "shared memory" in r.stdout
    st = json.loads(ctl(shared_engine, "status", "--json").stdout)
    assert {p["role"] for p in st["processes"]} == {"supervisor", "front", "gpu", "compositor"}
    assert all(p["uss_bytes"] > 0 for p in st["processes"])
    h = json.loads(ctl(shared_engine, "health").stdout)
    assert h["healthy"] and h["provider"] == ["CPUExecutionProvider"]
    assert h["gpu_workers"][0]["state"] == "ready"
    models = json.loads(ctl(shared_engine, "models").stdout)
    assert "demo" in [m["name"] for m in models]


def test_load_bench_unload(shared_engine, tmp_path):
    r = ctl(shared_engine, "load", "demo")
    assert r.returncode == 0, r.stderr
    assert "12 frames 1280x720" in r.stdout
    r = ctl(shared_engine, "bench", "--model", "demo", "--batches", "2", "--batch-size", "4", "--clients", "2",
            "--save", str(tmp_path / "frames"), "--json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "throughput" in r.stdout and "frames/s" in r.stdout
    jpegs = sorted((tmp_path / "frames").glob("*.jpg"))
    assert len(jpegs) == 8 and all(j.read_bytes()[:2] == b"\xff\xd8" for j in jpegs)
    assert json.loads((tmp_path / "b.json").read_text())["engine"]["frames"] == 16
    r = ctl(shared_engine, "unload", "demo")
    assert r.returncode == 0 and json.loads(r.stdout)["unloaded"] is True
    r = ctl(shared_engine, "unload", "nobody")
    assert r.returncode != 0 and "unknown_model" in r.stderr


def test_bench_streams_search(shared_engine, tmp_path):
    r = ctl(shared_engine, "bench-streams", "--search", "--max", "2", "--seconds", "1.5",
            "--json", str(tmp_path / "cap.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warm-up" in r.stdout and "capacity:" in r.stdout
    out = json.loads((tmp_path / "cap.json").read_text())
    assert out["capacity"] in (0, 1, 2) and out["rate"] == 24.5 and out["slack_ms"] == 150
    assert [row["streams"] for row in out["rows"]][:1] == [1]
    assert all(row["frames"] == row["streams"] * 38 or not row["ok"] for row in out["rows"])


def test_check_reports_fp16_error_without_an_engine(tmp_path, models_root):
    cfg = write_config(tmp_path / "e.toml", models_root, tmp_path / "run", "tchk")
    run = lambda *a: subprocess.run([sys.executable, "-m", "engine.cli", "--config", str(cfg), "check", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run("demo")
    assert r.returncode == 0, r.stderr
    assert "fp16 against fp32 on 8 of its frames (CPUExecutionProvider)" in r.stdout
    assert "max |difference|" in r.stdout and "configured precision: fp32" in r.stdout
    report = json.loads(run("demo", "--json").stdout)
    assert 0 < report["mean_abs_diff"] <= report["max_abs_diff"] < 0.01
    assert report["file"].startswith(str(tmp_path / "run" / "cache" / "fp16"))
    r = run("nobody")
    assert r.returncode != 0 and "unknown avatar 'nobody'" in r.stderr


def test_bad_config_names_the_key(tmp_path, models_root):
    cfg = write_config(tmp_path / "e.toml", models_root, tmp_path / "run", "tbad", "[output]\njpeg_quality = 101\n")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "--config", str(cfg), "start"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "output.jpeg_quality" in r.stderr and "1..100" in r.stderr


@pytest.mark.skipif(bool(__import__("engine.runtime.config").runtime.config.detect_gpus()), reason="this machine has a GPU")
def test_gpu_that_cannot_start_stops_the_engine_with_a_message(tmp_path, models_root):
    inst = f"tg{os.getpid()}"
    cfg = write_config(tmp_path / "e.toml", models_root, tmp_path / "run", inst)
    cfg.write_text(cfg.read_text().replace("devices = []", "devices = [0]"))
    r = subprocess.run([sys.executable, "-m", "engine.cli", "--config", str(cfg), "start"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert re.search(r"gpu-\d could not start", r.stderr), r.stderr[-2000:]
    assert "GPU 0" in r.stderr
    assert list_segments(f"{inst}_") == []


def test_ctrl_c_stops_cleanly(engine_factory):
    eng = engine_factory()
    os.killpg(os.getpgid(eng.proc.pid), signal.SIGINT)      # what a terminal's Ctrl-C does
    assert eng.proc.wait(30) == 0
    time.sleep(0.2)
    assert list_segments(eng.prefix) == []
    assert "received SIGINT" in eng.log.read_text()
