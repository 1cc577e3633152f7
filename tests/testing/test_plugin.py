"""The pytest plugin as a user runs it: a throwaway project with only a test file, pytest in a
subprocess, the engine started by the plugin's fixture or running already (with CURVE)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil

from engine.runtime.shm import list_segments
from tests.conftest import make_keys

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "test_my_latency.py"
GENEROUS = {"LSE_COMPOSITE_P99_S": "600", "LSE_STREAM_SLACK_S": "600", "LSE_MIN_RATE_FPS": "1"}

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
    assert 0 < info["p50"] <= info["p95"] <= info["p99"] <= comp["stats"]["max"] + 1e-9
    stream = by_name["test_one_live_stream"]
    assert stream["stats"]["rounds"] == stream["extra_info"]["samples"] >= 90      # every frame of 4 s
    assert stream["extra_info"]["lookahead_floor_s"] > 0.3
    assert stream["extra_info"]["p99"] >= stream["extra_info"]["lookahead_floor_s"] * 0.5
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
