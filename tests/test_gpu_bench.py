"""tools/gpu_bench.py, the prepared GPU benchmark, in its quick CPU form: every section runs and
reports what the GPU run will (raw network per bucket in fp32/fp16, the engine with 1 and 2
workers, the stream capacity search, cold runs)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_gpu_bench_quick_on_the_cpu(tmp_path):
    # its TMPDIR (short: the engines' ipc socket paths are under it): the avatars and networks it
    # makes there (~90 MB) go when it ends
    scratch = Path(tempfile.mkdtemp(prefix="lse-gb-"))
    try:
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_bench.py"), "--quick", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=280, cwd=ROOT,
                           env={**os.environ, "TMPDIR": str(scratch)})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert not list(scratch.glob("gpubench*"))       # (onnxruntime leaves its own .ses file)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    raw = report["raw"]
    assert [(x["precision"], x["path"], x["batch"]) for x in raw] == [
        ("fp32", "bind_ring", 1), ("fp32", "bind_ring", 2), ("fp32", "device_buffers", 1),
        ("fp32", "device_buffers", 2), ("fp16", "bind_ring", 1), ("fp16", "bind_ring", 2)]
    assert all(x["fps"] > 0 and x["cold_runs"] == 0 and not x["fallback"] for x in raw)
    err = raw[-1]["fp16_error"]
    assert 0 < err["mean_abs_diff"] <= err["max_abs_diff"] < 0.01
    eng = report["engine"]
    assert [x["gpu_workers"] for x in eng["throughput"]] == [1, 2]
    assert all(x["fps"] > 0 and x["errors"] == 0 and x["cold_runs"] == 0 for x in eng["throughput"])
    cap = eng["capacity"]
    assert cap["capacity"] in (0, 1, 2) and cap["rows"][0]["streams"] == 1 and cap["cold_runs"] == 0
    out = r.stdout
    for head in ("| precision | asked |", "| GPU workers | clients |", "| streams | frames |", "stream capacity"):
        assert head in out
    assert (tmp_path / "engine_1.log").is_file()
