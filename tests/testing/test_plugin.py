"""The pytest plugin as a user runs it: a throwaway project with only a test file, pytest in a
subprocess, the engine started by the plugin's fixture or running already (with and without
CURVE), the runs saved and compared by pytest-benchmark."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil

from engine.runtime.shm import list_segments
from tests.conftest import make_keys

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "test_my_latency.py"
GENEROUS = {"LSE_COMPOSITE_P99_S": "600", "LSE_STREAM_SLACK_S": "600", "LSE_MIN_RATE_FPS": "1"}

TWO_LIVE_STREAMS = '''
def test_two_live_streams(lse_measure, lse_avatar):
    lse_measure.stream_latency(lse_avatar, streams=2, seconds=2)
'''

FAILING = '''
def test_a_user_test_that_fails(lse_client, lse_avatar):
    assert lse_client.health()["healthy"]
    assert False, "the user's own failure"
'''


def run_pytest(project: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LSE_"))}
    env.update(GENEROUS)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


def segments_left(basetemp: Path) -> list[str]:
    """Shared-memory segments still there of the engines the plugin started under ``basetemp`` (each
    has its own instance, written in its engine.toml); other tests' engines run beside this one."""
    instances = [tomllib.loads(p.read_text())["server"]["instance"] for p in basetemp.rglob("engine.toml")
                 if "instance" in tomllib.loads(p.read_text()).get("server", {})]
    assert instances, f"no engine config under {basetemp}"
    return [s for i in instances for s in list_segments(f"{i}_")]


def documented_extra(call: str) -> set[str]:
    """The ``extra_info`` keys docs/latency-suites.md gives for ``lse_measure.<call>``: the
    percentiles of the samples, their count and its table's ``extra`` column."""
    row = next(line for line in (ROOT / "docs" / "latency-suites.md").read_text().splitlines()
               if line.startswith(f"| `lse_measure.{call}("))
    return {"p50", "p95", "p99", "samples", *re.findall(r"`(\w+)`", row.split(" | ")[-1])}


def ordered(info: dict, prefix: str = "") -> bool:
    return 0 < info[f"{prefix}p50"] <= info[f"{prefix}p95"] <= info[f"{prefix}p99"]


def engines_of(project: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(project) in a for a in (p.info["cmdline"] or [])):
            out.append(p)
    return out


def test_the_example_suite_starts_an_engine_reports_percentiles_and_cleans_up_after_a_failure(tmp_path):
    project = tmp_path / "my_project"
    project.mkdir()
    shutil.copy(EXAMPLE, project / "test_my_latency.py")
    (project / "test_fails.py").write_text(FAILING)
    r = run_pytest(project, "-k", "not two_streams", "--benchmark-json=out.json", f"--basetemp={tmp_path / 'bt'}")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 failed, 3 passed" in r.stdout, r.stdout[-3000:]
    assert "the user's own failure" in r.stdout
    report = json.loads((project / "out.json").read_text())
    by_name = {b["name"]: b for b in report["benchmarks"]}
    comp = by_name["test_composite_round_trip[12]"]
    assert comp["stats"]["rounds"] == 10 and comp["extra_info"]["batch_size"] == 12
    info = comp["extra_info"]
    assert set(info) == documented_extra("composite")
    assert ordered(info) and info["p99"] <= comp["stats"]["max"] + 1e-9
    assert comp["stats"]["min"] - 1e-9 <= info["p50"] and abs(info["p50"] - comp["stats"]["median"]) < 1e-5
    stream = by_name["test_one_live_stream"]
    info = stream["extra_info"]
    assert set(info) == documented_extra("stream_latency")
    assert stream["stats"]["rounds"] == info["samples"] == info["frames"] >= 90      # every frame of 4 s
    assert info["lookahead_floor_s"] > 0.3
    assert info["p99"] >= info["lookahead_floor_s"] * 0.5
    assert ordered(info) and ordered(info, "steady_") and info["steady_p99"] <= stream["stats"]["max"] + 1e-4
    # one stream: one first frame, each of its percentiles that frame's latency, among the samples
    assert info["first_frame_p50"] == info["first_frame_p95"] == info["first_frame_p99"] == info["first_frame_max"]
    assert stream["stats"]["min"] - 1e-4 <= info["first_frame_max"] <= stream["stats"]["max"] + 1e-4
    # the engine the fixture started is gone, with its shared memory, though a test failed
    assert engines_of(tmp_path / "bt") == [] and segments_left(tmp_path / "bt") == []


def test_against_an_engine_that_runs_already_with_curve(tmp_path, engine_factory):
    keys = make_keys(tmp_path / "keys", ("me",), ("me",))
    eng = engine_factory(server=keys.server_toml())
    project = tmp_path / "p"
    project.mkdir()
    shutil.copy(EXAMPLE, project / "test_my_latency.py")
    args = ("-k", "composite_round_trip and 1]", "--benchmark-json=out.json", f"--lse-endpoint={eng.endpoint}",
            f"--lse-server-key={keys.folder / 'server.key'}", f"--lse-client-key={keys.folder / 'me.key_secret'}")
    r = run_pytest(project, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (b,) = json.loads((project / "out.json").read_text())["benchmarks"]
    assert b["stats"]["rounds"] == 10 and b["extra_info"]["p99"] > 0
    assert eng.proc.poll() is None                     # an engine the suite did not start is left running
    # without the keys the same suite is refused: the engine serves CURVE clients only
    r = run_pytest(project, "-k", "composite_round_trip and 1]", f"--lse-endpoint={eng.endpoint}",
                   "--lse-timeout=3", timeout=200)
    assert r.returncode == 1 and "1 error" in r.stdout, r.stdout[-3000:]
    assert "the engine requires CURVE (give the client keys)" in r.stdout


def test_against_an_engine_that_runs_already_without_curve_saving_and_comparing_runs(tmp_path, shared_engine):
    eng = shared_engine
    project = tmp_path / "p"
    project.mkdir()
    shutil.copy(EXAMPLE, project / "test_my_latency.py")
    (project / "test_streams.py").write_text(TWO_LIVE_STREAMS)
    one = ("-k", "composite_round_trip and 1]", f"--lse-endpoint={eng.endpoint}")
    # the run before the upgrade, saved by pytest-benchmark (with two streams' latency and frame rate)
    r = run_pytest(project, "-k", "composite_round_trip and 1] or two_streams or two_live",
                   f"--lse-endpoint={eng.endpoint}", "--benchmark-autosave", "--benchmark-json=out.json")
    assert r.returncode == 0 and "3 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    (saved,) = project.glob(".benchmarks/*/0001_*.json")
    by_name = {b["name"]: b for b in json.loads(saved.read_text())["benchmarks"]}
    assert by_name["test_composite_round_trip[1]"]["stats"]["rounds"] == 10
    live = by_name["test_two_live_streams"]
    info = live["extra_info"]
    assert set(info) == documented_extra("stream_latency") and info["streams"] == 2
    assert live["stats"]["rounds"] == info["frames"] >= 2 * 40 and ordered(info) and ordered(info, "steady_")
    # the first frames' percentiles are over the two streams' first frames a <= b (linear
    # interpolation: p50 = (a + b) / 2, p95 = a + 0.95 (b - a), p99 = a + 0.99 (b - a)), each a sample
    b = info["first_frame_max"]
    a = 2 * info["first_frame_p50"] - b
    assert abs(info["first_frame_p95"] - (a + 0.95 * (b - a))) < 2e-4
    assert abs(info["first_frame_p99"] - (a + 0.99 * (b - a))) < 2e-4
    assert live["stats"]["min"] - 2e-4 <= a <= b <= live["stats"]["max"] + 2e-4
    two = by_name["test_two_streams_keep_their_rate"]
    info = two["extra_info"]
    assert set(info) == documented_extra("stream_throughput") and info["streams"] == 2
    assert ordered(info) and info["p99"] <= two["stats"]["max"] + 1e-6
    # the samples are the intervals between each stream's frames: one fewer than its frames, and
    # their mean is 1 / a frame rate between the two streams'
    assert two["stats"]["rounds"] == info["samples"] == info["frames"] - 2 >= 2 * 80
    assert min(info["rates_fps"]) - 0.01 <= 1 / two["stats"]["mean"] <= max(info["rates_fps"]) + 0.01
    # after it: compared with the saved run, within a threshold it does not exceed
    r = run_pytest(project, *one, "--benchmark-compare", "--benchmark-compare-fail=median:1000%")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"Comparing against benchmarks from: {saved.parent.name}/{saved.name}" in r.stderr, r.stderr[-3000:]
    assert "test_composite_round_trip[1] (0001_" in r.stdout and "test_composite_round_trip[1] (NOW)" in r.stdout
    # against a baseline ten times as fast (the saved run, its times divided by 10) the check fails the run
    faster = json.loads(saved.read_text())
    for b in faster["benchmarks"]:
        b["stats"].update({k: v / 10 for k, v in b["stats"].items()
                           if k in ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "ld15iqr", "hd15iqr",
                                    "total")})
    (saved.parent / "0002_faster.json").write_text(json.dumps(faster))
    r = run_pytest(project, *one, "--benchmark-compare", "--benchmark-compare-fail=median:10%")
    out = r.stdout + r.stderr
    # the test itself passed; pytest-benchmark ends the session with its error and exit status 1
    assert r.returncode == 1 and re.search(r"test_my_latency\.py \.\s+\[100%\]", r.stdout), out[-3000:]
    assert "Performance has regressed" in out
    assert re.search(r"test_composite_round_trip\[1\] \(0002_faster\) - Field 'median' has failed "
                     r"PercentageRegressionCheck: \d+\.\d+ > 10\.0+", out), out[-3000:]
    assert eng.proc.poll() is None                     # an engine the suite did not start is left running


def test_an_engine_started_from_the_users_config_with_curve(tmp_path, models_root):
    keys = make_keys(tmp_path / "keys", ("me",), ("me",))
    project = tmp_path / "p"
    project.mkdir()
    shutil.copy(EXAMPLE, project / "test_my_latency.py")
    # the user's own config, paths relative to it, CURVE on; the plugin gives it its own port and run dir
    (project / "engine.toml").write_text(
        f'models_root = "{models_root}"\n[server]\nfront = "tcp://127.0.0.1:5555"\n'
        f'curve_secret_key = "../keys/server.key_secret"\ncurve_clients = "../keys/clients"\n'
        '[gpu]\ndevices = []\n[compositor]\nprocesses = 1\n')
    r = run_pytest(project, "-k", "composite_round_trip and 1]", "--lse-config=engine.toml", "--benchmark-json=out.json",
                   f"--lse-server-key={keys.folder / 'server.key'}", f"--lse-client-key={keys.folder / 'me.key_secret'}",
                   f"--basetemp={tmp_path / 'bt'}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (b,) = json.loads((project / "out.json").read_text())["benchmarks"]
    assert b["stats"]["rounds"] == 10
    log = next((tmp_path / "bt").rglob("engine.log")).read_text()
    assert "CURVE" in log and "tcp://127.0.0.1:5555" not in log
    assert engines_of(tmp_path / "bt") == [] and segments_left(tmp_path / "bt") == []
