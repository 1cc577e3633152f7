"""Per-key quotas: the policy with simulated time, then a real engine with two client keys."""
from __future__ import annotations

import time

import numpy as np
import pytest

from engine import protocol as P
from engine.audio.speech import speech_pcm
from engine.client import Client, EngineError
from engine.front.connections import Connection, Connections
from engine.front.quotas import FrontQuotas, QuotaExceeded, Quotas, request_frames
from engine.protocol import ProtocolError
from engine.runtime.config import config_from_dict
from tests.conftest import make_keys


def quotas(**table) -> Quotas:
    return Quotas(config_from_dict({"quotas": table}).quotas)


def test_defaults_and_per_client_overrides():
    q = quotas(streams=4, clients={"alice": {"streams": 1, "frames_per_second": 50}})
    assert (q.quota("alice").streams, q.quota("alice").requests, q.quota("alice").frames_per_second) == (1, 256, 50)
    assert (q.quota("bob").streams, q.quota("bob").frames_per_second) == (4, 0)
    q.check_streams("alice", 0)
    with pytest.raises(QuotaExceeded, match="quotas.streams = 1"):
        q.check_streams("alice", 1)
    q.check_streams("bob", 3)
    q.check_requests("bob", 255)
    with pytest.raises(QuotaExceeded) as e:
        q.check_requests("bob", 256)
    assert e.value.quota == "requests"


def test_frame_bucket_holds_one_second_and_refills_at_the_rate():
    q = quotas(frames_per_second=10)
    q.take_frames("k", 8, now=0.0)
    with pytest.raises(QuotaExceeded, match="fits in 600 ms"):
        q.take_frames("k", 8, now=0.0)               # 2 left: 6 more frames take 0.6 s
    q.take_frames("k", 8, now=0.6)                   # refused requests took nothing
    q.take_frames("k", 10, now=10.0)                 # full again, never more than one second's worth
    with pytest.raises(QuotaExceeded):
        q.take_frames("k", 1, now=10.0)
    with pytest.raises(QuotaExceeded, match="more than client key 'k' may ask for in a second"):
        q.take_frames("k", 11, now=100.0)
    q.take_frames("other", 10, now=10.0)             # every key has its own bucket
    quotas().take_frames("k", 1e9, now=0.0)          # 0 = no limit


def test_request_frames():
    audio = np.zeros((6, 32, 16, 16), np.float32)
    req = P.parse_request([b"x"], P.encode_request(1, "composite", {"batch_size": 6}, [("audio_features", audio)]))
    assert request_frames(req) == 6
    pcm = np.zeros(1600, np.float32)
    req = P.parse_request([b"x"], P.encode_request(2, "stream_audio", {"stream": "s1"}, [("pcm", pcm)]))
    assert request_frames(req) == 2.5
    assert request_frames(P.parse_request([b"x"], P.encode_request(3, "health"))) == 0
    req = P.parse_request([b"x"], P.encode_request(4, "composite", {"batch_size": "6"}))
    assert request_frames(req) == 0                  # invalid: refused later by the method's own checks


def test_front_quotas_sum_over_every_connection_of_a_key():
    conns = Connections(1 << 20)
    for ident, key in ((b"a1", "alice"), (b"a2", "alice"), (b"b1", "bob")):
        conns.by_id[ident] = Connection(ident, key=key)
        conns.by_key.setdefault(key, set()).add(ident)
    conns.by_id[b"a1"].requests, conns.by_id[b"a2"].requests = 1, 1
    conns.by_id[b"a1"].streams.add("s1")
    seen: list[tuple[str, str]] = []
    fq = FrontQuotas(config_from_dict({"quotas": {"requests": 2, "streams": 1}}).quotas, conns, True,
                     lambda k, q: seen.append((k, q)))
    req = P.parse_request([b"a2"], P.encode_request(9, "health"))
    with pytest.raises(ProtocolError) as e:
        fq.admit(conns.by_id[b"a2"], req)            # a2 holds 1, a1 holds 1: the key holds 2
    assert e.value.code == P.QUOTA_EXCEEDED and e.value.req_id == 9
    fq.admit(conns.by_id[b"b1"], req)                # bob is not affected
    with pytest.raises(ProtocolError):
        fq.check_streams(b"a2", 5)                   # a1's stream counts for a2 too
    fq.check_streams(b"b1")
    assert seen == [("alice", "requests"), ("alice", "streams")]
    conns.forget(b"a1")
    fq.admit(conns.by_id[b"a2"], req)
    fq.check_streams(b"a2")
    off = FrontQuotas(config_from_dict({"quotas": {"requests": 1}}).quotas, conns, False)
    off.admit(conns.by_id[b"a2"], req)               # without CURVE: no quotas


# -- a real engine -------------------------------------------------------------------------------
QUOTAS = """
[quotas]
streams = 2
[quotas.clients.alice]
requests = 2
streams = 1
frames_per_second = 10
"""


def composite_parts(req_id, batch: int) -> tuple[str, dict, list]:
    audio = np.random.default_rng(req_id).standard_normal((batch, 32, 16, 16)).astype(np.float32)
    return "composite", {"model": "demo", "batch_size": batch}, [("audio_features", audio)]


def codes(client: Client, ids: list[int]) -> list[str]:
    out = []
    for i in ids:
        r = client.receive(i, timeout=120)
        out.append("ok" if r.ok else r.error["code"])
    return out


@pytest.mark.integration
def test_quotas_per_key_with_the_documented_error(engine_factory, tmp_path):
    keys = make_keys(tmp_path / "keys", ("alice", "bob"), ("alice", "bob"))
    eng = engine_factory(QUOTAS, server=keys.server_toml())
    with Client(eng.endpoint, timeout=120, keys=keys.client("alice")) as a1, \
            Client(eng.endpoint, timeout=120, keys=keys.client("alice")) as a2, \
            Client(eng.endpoint, timeout=120, keys=keys.client("bob")) as bob:
        # pending requests, over two connections of one key: the avatar is not loaded yet, so the
        # first requests wait for it (~0.5 s) while the others arrive
        ids1 = [a1.submit(*composite_parts(i, 1)) for i in range(3)]
        ids2 = [a2.submit(*composite_parts(i, 1)) for i in range(2)]
        replies = [a1.receive(i, timeout=120) for i in ids1] + [a2.receive(i, timeout=120) for i in ids2]
        # the ROUTER takes the two connections' messages in turns: which ones pass depends on that
        # order, how many does not: two waiting at a time
        assert sorted("ok" if r.ok else r.error["code"] for r in replies) == ["ok"] * 2 + ["quota_exceeded"] * 3
        refused = next(r for r in replies if not r.ok)
        assert "client key 'alice' has 2 requests waiting" in refused.error["message"]
        assert "quotas.requests = 2" in refused.error["message"]
        assert codes(a2, [a2.submit(*composite_parts(3, 1))]) == ["ok"]    # replies came: room again
        # bob's default quota (256 requests) lets all of his through at the same time
        assert codes(bob, [bob.submit(*composite_parts(i, 1)) for i in range(5)]) == ["ok"] * 5

        # frames per second: alice may ask for 10 at once, then 10 a second; bob has no limit
        time.sleep(1.1)                              # her bucket refills (the requests above took from it)
        assert codes(a1, [a1.submit(*composite_parts(1, 8)) for _ in range(2)]) == ["ok", "quota_exceeded"]
        assert codes(bob, [bob.submit(*composite_parts(1, 8)) for _ in range(2)]) == ["ok", "ok"]
        with pytest.raises(EngineError, match="quota_exceeded: 12 frames in one request"):
            a1.call(*composite_parts(2, 12))

        # open streams: one for alice whatever the connection, two for bob
        s = a1.open_stream("demo", realtime=False)
        with pytest.raises(EngineError) as e:
            a2.open_stream("demo")
        assert e.value.code == "quota_exceeded" and "quotas.streams = 1" in e.value.message
        b1, b2 = bob.open_stream("demo"), bob.open_stream("demo")
        with pytest.raises(EngineError, match="quota_exceeded"):
            bob.open_stream("demo")
        # audio counts as frames: 1 s of audio is 25 frames, more than alice's 10 per second
        with pytest.raises(EngineError, match="quota_exceeded: 25 frames in one request"):
            s.push(speech_pcm(1.0))
        s.close()
        a2.open_stream("demo").close()               # the stream closed: alice may open one again
        b1.close()
        b2.close()
    log = eng.log.read_text()
    assert "quota exceeded: client key 'alice'" in log and "[client=alice id=" in log
