"""The host agent (engine.cluster.agent.Agent) against real engines, without Ray: what it reports
of a healthy engine, an avatar it prepares becoming hot, draining, an endpoint where nothing
listens (reported down quickly, naming it; healthy once an engine comes up there) and a CURVE
engine reached with the host's key files. The Ray deployment around it: tests/cluster/test_cluster.py."""
from __future__ import annotations

import asyncio
import time

import pytest

from engine.client import Client
from engine.cluster.agent import TIMEOUT_S, Agent
from engine.cluster.table import Table
from engine.runtime import keys as K
from tests.conftest import free_port, make_keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def run(agent: Agent, coro_fn):
    """Run ``coro_fn()`` in a fresh event loop and close the agent's engine client in that loop."""
    async def go():
        try:
            return await coro_fn()
        finally:
            agent._drop_client()
    return asyncio.run(go())


async def poll(agent: Agent, ok, timeout: float) -> dict:
    """Reports until ``ok(report)``; the last one (the test asserts on it)."""
    deadline = time.monotonic() + timeout
    while True:
        r = await agent.report()
        if ok(r) or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.2)


def engine_health(endpoint: str, keys=None) -> dict:
    with Client(endpoint, timeout=30, keys=keys) as c:
        return c.health()


def test_report_of_a_healthy_engine(shared_engine):
    agent = Agent("h0", shared_engine.endpoint)
    r = run(agent, agent.report)
    health = engine_health(shared_engine.endpoint)
    bg = health["background_bytes"]
    assert r["healthy"] is True and r["error"] == ""
    assert (r["host"], r["endpoint"], r["server_key"], r["draining"]) == ("h0", shared_engine.endpoint, None, False)
    assert r["gpus"] == len(health["gpu_workers"]) >= 1
    assert r["load"] == 0 and r["streams"] == 0
    assert r["free_bytes"] == bg["budget"] - bg["used"] > 0
    assert "demo" in r["known"]
    assert isinstance(r["hot"], list) and set(r["hot"]) <= set(r["known"])
    # the router takes it as it is
    t = Table()
    t.update(r)
    code, body = t.resolve("demo")
    assert (code, body["host"], body["endpoint"]) == (200, "h0", shared_engine.endpoint)
    assert t.resolve("no-such-avatar")[0] == 404


def test_prepare_makes_the_avatar_hot_within_seconds(shared_engine):
    with Client(shared_engine.endpoint, timeout=30) as c:
        c.call("unload", {"model": "demo"})                  # whatever an earlier test did
    agent = Agent("h0", shared_engine.endpoint)

    async def go():
        before = await poll(agent, lambda r: "demo" not in r["hot"], 5)
        assert before["healthy"] and "demo" not in before["hot"], before
        t0 = time.monotonic()
        assert await agent.prepare("demo") is None           # returns at once, loads in the background
        assert time.monotonic() - t0 < 0.5
        after = await poll(agent, lambda r: "demo" in r["hot"], 10)
        return before, after
    before, after = run(agent, go)
    assert "demo" in after["hot"], after
    assert after["free_bytes"] < before["free_bytes"]         # its backgrounds took shared memory
    with Client(shared_engine.endpoint, timeout=30) as c:
        assert next(m for m in c.models() if m["name"] == "demo")["state"] in ("loaded", "loading")


def test_prepare_of_an_unknown_avatar_is_only_logged(shared_engine, caplog):
    agent = Agent("h0", shared_engine.endpoint)

    async def go():
        await agent.prepare("no-such-avatar")
        deadline = time.monotonic() + 10
        while agent._loads and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await agent.report()
    with caplog.at_level("WARNING", logger="engine.cluster.agent"):
        r = run(agent, go)
    assert r["healthy"] and "no-such-avatar" not in r["hot"]
    assert any("no-such-avatar" in rec.getMessage() and "h0" in rec.getMessage() for rec in caplog.records)


def test_draining_is_reported_and_keeps_new_work_away(shared_engine):
    agent = Agent("h0", shared_engine.endpoint)

    async def go():
        assert (await agent.report())["draining"] is False
        assert await agent.set_draining(True) is True
        on = await agent.report()
        assert await agent.set_draining(False) is False
        return on, await agent.report()
    on, off = run(agent, go)
    assert on["draining"] is True and on["healthy"] is True
    assert off["draining"] is False
    t = Table()
    t.update(on)
    code, body = t.resolve("demo")
    assert (code, body["error"]) == (503, "no_host") and "draining" in body["message"]
    t.update(off)
    assert t.resolve("demo")[0] == 200


def test_nothing_listening_is_reported_down_quickly_then_healthy_once_an_engine_is_there(engine_factory):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    agent = Agent("h9", endpoint)

    async def down():
        t0 = time.monotonic()
        r = await agent.report()
        return r, time.monotonic() - t0
    r, took = run(agent, down)
    assert took < TIMEOUT_S + 1.0, took
    assert r["healthy"] is False and r["host"] == "h9" and r["endpoint"] == endpoint
    assert endpoint in r["error"] and "did not answer" in r["error"]
    assert r["hot"] == [] and r["known"] is None
    t = Table()
    t.update(r)
    code, body = t.resolve("demo")
    assert code == 503 and endpoint in body["message"]

    eng = engine_factory(server=f'front = "{endpoint}"')
    assert eng.endpoint == endpoint
    r = run(agent, lambda: poll(agent, lambda r: r["healthy"], 10))
    assert r["healthy"] is True and "demo" in r["known"], r
    t.update(r)
    assert t.resolve("demo")[1]["endpoint"] == endpoint


@pytest.fixture
def curve_engine(engine_factory, tmp_path):
    keys = make_keys(tmp_path / "keys", ("agent", "stranger"), ("agent",))
    return engine_factory(server=keys.server_toml()), keys


def test_an_agent_of_a_curve_engine_reports_it_with_its_server_key(curve_engine):
    eng, keys = curve_engine
    public, _ = K.load(keys.folder / "server.key")
    agent = Agent("hc", eng.endpoint, server_key_file=str(keys.folder / "server.key"),
                  client_key_file=str(keys.folder / "agent.key_secret"))
    assert agent.server_key == public.decode()
    r = run(agent, agent.report)
    assert r["healthy"] is True, r
    assert r["server_key"] == public.decode() and len(r["server_key"]) == 40
    assert "demo" in r["known"]
    health = engine_health(eng.endpoint, keys.client("agent"))
    assert r["free_bytes"] == health["background_bytes"]["budget"] - health["background_bytes"]["used"]
    t = Table()
    t.update(r)
    assert t.resolve("demo")[1]["server_key"] == public.decode()

    # a key the engine does not authorise, or no key at all: down, within the timeout, naming the engine
    for bad in (Agent("hc", eng.endpoint, server_key_file=str(keys.folder / "server.key"),
                      client_key_file=str(keys.folder / "stranger.key_secret")),
                Agent("hc", eng.endpoint)):
        t0 = time.monotonic()
        r = run(bad, bad.report)
        assert time.monotonic() - t0 < TIMEOUT_S + 1.0
        assert r["healthy"] is False and eng.endpoint in r["error"], r
