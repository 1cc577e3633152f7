"""The conformance transcripts (docs/conformance/) against a real engine, through both shipped
runners, and their coverage of every method and error code of engine/protocol.py."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from engine import protocol as P

ROOT = Path(__file__).resolve().parents[1]
TRANSCRIPTS = sorted((ROOT / "docs" / "conformance").glob("*.json"))
TRANSCRIPTS = [p for p in TRANSCRIPTS if p.name != "conditions.json"]


def runner(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "frontends" / "conformance" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_raw_pyzmq_runner_passes_every_transcript(shared_engine):
    assert runner("run_pyzmq").run(shared_engine.endpoint, TRANSCRIPTS) == []


def test_python_client_runner_passes_every_transcript(shared_engine):
    failures, skipped = runner("run_client").run(shared_engine.endpoint, TRANSCRIPTS)
    assert failures == []
    raw = sum(1 for p in TRANSCRIPTS for s in json.loads(p.read_text())["steps"] if s.get("raw"))
    assert skipped == raw < sum(len(json.loads(p.read_text())["steps"]) for p in TRANSCRIPTS)


def test_a_runner_reports_a_wrong_answer(shared_engine, tmp_path):
    t = json.loads((ROOT / "docs" / "conformance" / "batch.json").read_text())
    t["steps"][1]["expect"]["buffers"][0]["shape"] = [2, 3, 320, 321]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(t))
    (failure,) = runner("run_pyzmq").run(shared_engine.endpoint, [bad])
    assert "shape = [2, 3, 320, 320], expected [2, 3, 320, 321]" in failure


def error_codes() -> set[str]:
    src = (ROOT / "engine" / "protocol.py").read_text()
    block = src[src.index("# error codes"):src.index("class ProtocolError")]
    return set(re.findall(r'^[A-Z_]+ = "([a-z_]+)"', block, re.M))


def test_every_method_and_error_code_has_a_transcript_or_a_named_condition():
    covered = set()
    for p in TRANSCRIPTS:
        covered |= set(json.loads(p.read_text())["covers"])
    conditions = json.loads((ROOT / "docs" / "conformance" / "conditions.json").read_text())["codes"]
    codes = error_codes()
    assert len(codes) >= 15
    missing = (set(P.METHODS) | codes) - covered - set(conditions)
    assert not missing, f"no transcript and no condition for {sorted(missing)}: add one to docs/conformance/"
    for code, c in conditions.items():
        assert code in codes
        if c["test"] is None:
            assert c["why"]
            continue
        path, name = c["test"].split("::")
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), c["test"]


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.name)
def test_transcripts_are_well_formed(path):
    t = json.loads(path.read_text())
    assert t["title"] and t["covers"] and t["steps"]
    for s in t["steps"]:
        assert s["send"] and s["expect"]["status"] in ("ok", "error")
        assert s["send"][0].keys() & {"json", "text", "hex"}
