"""The Node.js client (frontends/node) installed as a user installs it (npm, from the folder), run
with real node against real engines: the conformance transcripts, the example, and a CURVE stream
whose pushes meet back-pressure."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_keys

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None or shutil.which("npm") is None,
                                reason="node and npm are not installed: the Node.js client needs them (Debian: nodejs, npm)")


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Path:
    """A user's project with the client installed from the folder (npm install /path/to/frontends/node)."""
    app = tmp_path_factory.mktemp("node_app")
    pkg = app / "pkg"
    shutil.copytree(ROOT / "frontends" / "node", pkg, ignore=shutil.ignore_patterns("node_modules"))
    r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", str(pkg)], cwd=app, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return app


def node(app: Path, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([NODE, "-e", code], cwd=app, capture_output=True, text=True, timeout=timeout)


def test_the_conformance_transcripts_pass_through_the_node_client(app, shared_engine):
    files = [str(p) for p in sorted((ROOT / "docs" / "conformance").glob("*.json"))]
    r = subprocess.run([NODE, "node_modules/lipsync-engine-client/conformance.js", shared_engine.endpoint, *files],
                       cwd=app, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "transcripts passed" in r.stdout


def test_the_example_saves_the_demo_avatars_frames(app, shared_engine, tmp_path):
    r = subprocess.run([NODE, "node_modules/lipsync-engine-client/example.js", shared_engine.endpoint, str(tmp_path)],
                       cwd=app, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    jpegs = sorted(tmp_path.glob("frame_*.jpg"))
    assert len(jpegs) == 25 and all(p.read_bytes()[:2] == b"\xff\xd8" for p in jpegs)


def test_curve_stream_with_back_pressure_and_typed_errors(app, engine_factory, tmp_path):
    keys = make_keys(tmp_path / "keys", ("me",), ("me",))
    eng = engine_factory("[streams]\nmax_audio_ahead_s = 1\n", server=keys.server_toml())
    opts = json.dumps({"timeout": 60, "serverKey": str(keys.folder / "server.key"),
                       "clientKey": str(keys.folder / "me.key_secret")})
    code = f"""
const {{ Client, EngineError, EngineTimeout }} = require('lipsync-engine-client');
(async () => {{
  const c = new Client({json.dumps(eng.endpoint)}, {opts});
  const s = await c.openStream('demo', {{ realtime: true }});
  const chunk = new Int16Array(6400).fill(0);            // 0.4 s each: the third is over 1 s ahead (busy)
  const t0 = Date.now();
  let r;
  for (let i = 0; i < 4; i++) r = await s.push(chunk, {{ end: i === 3 }});
  const waited = Date.now() - t0;
  let n = 0, last = -1;
  for await (const f of s.frames()) {{ if (f.number !== last + 1) throw new Error('out of order'); last = f.number; n++; }}
  let code = null;
  try {{ await c.composite('nobody', new Float32Array(8192), 1); }} catch (e) {{ code = e instanceof EngineError ? e.code : String(e); }}
  c.close();
  const plain = new Client({json.dumps(eng.endpoint)}, {{ timeout: 2 }});
  let refused = null;
  try {{ await plain.health(); }} catch (e) {{ refused = e instanceof EngineTimeout; }}
  plain.close();
  console.log(JSON.stringify({{ n, total: r.frames_total, waited, retries: s.busyRetries, code, refused }}));
}})().catch(e => {{ console.error(e); process.exit(1); }});
"""
    r = node(app, code)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == out["total"] == 40
    assert out["retries"] > 0 and out["waited"] >= 100     # refused with busy until frames had played out
    assert out["code"] == "unknown_model" and out["refused"] is True
