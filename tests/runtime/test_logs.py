"""engine/runtime/logs.py: the size-bounded log writer; log formats (JSON lines and text), each line about a
request naming it; a real engine in JSON."""
from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from engine.client import Client, EngineError
from engine.runtime.logs import JsonFormatter, RotatingWriter, TextFormatter, _RequestFilter, request_scope, set_request


def test_rotates_at_line_boundaries_and_keeps_the_backups(tmp_path):
    w = RotatingWriter(tmp_path / "engine.log", max_bytes=100, backups=2)
    lines = [f"line {i:03d} {'x' * 20}\n".encode() for i in range(40)]          # 30 bytes each
    for line in lines:
        w.write(line)
    w.write(b"".join(lines[:10]))                                                 # one big write
    w.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["engine.log", "engine.log.1", "engine.log.2"]
    for name in files:
        data = (tmp_path / name).read_bytes()
        assert 0 < len(data) <= 100 and data.endswith(b"\n")                       # whole lines only
    newest = (tmp_path / "engine.log.1").read_bytes() + (tmp_path / "engine.log").read_bytes()
    assert newest.endswith(b"".join(lines[:10])[-len(newest):])


def test_a_line_longer_than_a_file_is_cut(tmp_path):
    w = RotatingWriter(tmp_path / "e.log", max_bytes=64, backups=1)
    w.write(b"y" * 200 + b"\n")
    w.close()
    assert all(p.stat().st_size <= 64 for p in tmp_path.iterdir())


def test_appends_to_an_existing_file(tmp_path):
    (tmp_path / "e.log").write_bytes(b"old\n")
    w = RotatingWriter(tmp_path / "e.log", max_bytes=1000, backups=1)
    w.write(b"new\n")
    w.close()
    assert (tmp_path / "e.log").read_bytes() == b"old\nnew\n"

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR)")


class _Req:
    def __init__(self, req_id, method="composite", identity=b"\x00\x01"):
        self.id, self.method, self.envelope = req_id, method, [identity]


class _Front:
    def __init__(self, logger):
        self.log = logger

    def client_label(self, identity: bytes) -> str:
        return "alice"

    @request_scope
    def handle(self, req):
        self.log.warning("about the request")

    @request_scope
    def on_client(self, frames):
        self.log.info("before parsing")
        set_request("r-9", "bob", "health")
        self.log.info("after parsing")


def capture(fmt: logging.Formatter):
    logger = logging.getLogger(f"test.logs.{id(fmt)}")
    logger.propagate = False
    lines: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))
    h = H()
    h.setFormatter(fmt)
    h.addFilter(_RequestFilter())
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    return logger, lines


def test_json_lines_carry_the_request():
    logger, lines = capture(JsonFormatter("front-0"))
    front = _Front(logger)
    front.handle(_Req(42))
    job = type("Job", (), {"req": _Req("x-1", "infer")})()
    front.handle(job)                                             # a job: the request it holds
    front.on_client([b"frames"])
    logger.info("not about a request")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    recs = [json.loads(line) for line in lines]
    assert recs[0]["request_id"] == 42 and recs[0]["client"] == "alice" and recs[0]["method"] == "composite"
    assert recs[0]["role"] == "front-0" and recs[0]["level"] == "WARNING" and recs[0]["msg"] == "about the request"
    assert recs[1]["request_id"] == "x-1" and recs[1]["method"] == "infer"
    assert "request_id" not in recs[2]                            # before the request was parsed
    assert (recs[3]["request_id"], recs[3]["client"]) == ("r-9", "bob")
    assert "request_id" not in recs[4]                            # the scope ended
    assert "ValueError: boom" in recs[5]["exc"] and len(lines) == 6
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", recs[0]["ts"])


def test_text_lines_append_the_request():
    logger, lines = capture(TextFormatter("front-0"))
    _Front(logger).handle(_Req(None))
    assert lines[0].endswith("about the request [client=alice id=null composite]")
    assert TEXT_LINE.match(lines[0])


@pytest.mark.integration
def test_engine_writes_json_lines_naming_each_request(engine_factory):
    eng = engine_factory(server='log_format = "json"\nlog_level = "DEBUG"')
    audio = np.zeros((3, 32, 16, 16), np.float32)
    with Client(eng.endpoint, timeout=120) as c:
        rid = c.submit("composite", {"model": "demo", "batch_size": 3}, [("audio_features", audio)])
        assert c.receive(rid).ok
        with pytest.raises(EngineError):
            c.call("composite", {"model": "nosuch", "batch_size": 1}, [("audio_features", audio[:1])])
        with pytest.raises(EngineError):                         # a reply to an unknown method: logged too
            c.call("no_such_method", {})
    eng.stop()
    lines = eng.log.read_text().splitlines()
    records = []
    for line in lines:
        assert not TEXT_LINE.match(line), f"a text log line in JSON mode: {line}"
        if line.startswith("{"):
            records.append(json.loads(line))
    roles = {r["role"] for r in records}
    assert {"supervisor", "front-0", "gpu-0"} <= roles
    mine = [r for r in records if r.get("request_id") == rid and r.get("method") == "composite"]
    assert any(r["msg"] == "reply ok" or r["msg"].startswith("reply ok after") for r in mine), mine
    assert all(r["client"] and r["logger"] == "engine.front" for r in mine)
    failed = [r for r in records if r.get("method") == "composite" and "unknown_model" in r["msg"]]
    assert failed and failed[0]["request_id"] == rid + 1
    assert any(r["msg"] == "reply unknown_method to a request that could not be read" and r["client"]
               for r in records), [r["msg"] for r in records if r.get("role") == "front-0"][-5:]
