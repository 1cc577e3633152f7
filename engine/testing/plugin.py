"""The lipsync-engine pytest plugin (pytest11 entry point ``lipsync_engine``): fixtures for a team's
own latency suite. docs/latency-suites.md shows a whole suite.

Options::

    --lse-endpoint URL     test an engine that runs already (default: start one for the session)
    --lse-config PATH      the engine.toml to start it from (default: the demo avatar on this machine)
    --lse-server-key PATH  CURVE: the engine's public key file (NAME.key)
    --lse-client-key PATH  CURVE: this client's secret key file (NAME.key_secret)
    --lse-avatar NAME      the avatar ``lse_avatar`` loads (default: demo)
    --lse-timeout SECONDS  how long the client waits for a reply (default: 120)

Fixtures: ``lse_engine`` (session: :class:`engine.testing.engine.EngineUnderTest`, stopped and its
shared memory checked at the end of the session however the tests went), ``lse_client`` (a connected
:class:`engine.client.Client`), ``lse_avatar`` (the avatar's name, loaded), ``lse_measure`` (the
measurements of :mod:`engine.testing.measure`, reporting through the test's ``benchmark`` fixture).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("lipsync-engine", "lipsync-engine latency suites")
    g.addoption("--lse-endpoint", default=None, help="endpoint of a running engine to test (default: start one)")
    g.addoption("--lse-config", default=None, help="engine.toml the engine under test starts from "
                                                   "(default: the demo avatar)")
    g.addoption("--lse-server-key", default=None, help="CURVE: the engine's public key file")
    g.addoption("--lse-client-key", default=None, help="CURVE: this client's secret key file")
    g.addoption("--lse-avatar", default="demo", help="the avatar lse_avatar loads (default: demo)")
    g.addoption("--lse-timeout", type=float, default=120.0, help="seconds the client waits for a reply (default: 120)")


def _keys(config: pytest.Config) -> Any:
    server, client = config.getoption("--lse-server-key"), config.getoption("--lse-client-key")
    if not server and not client:
        return None
    if not (server and client):
        raise pytest.UsageError("--lse-server-key and --lse-client-key go together (CURVE needs both)")
    from engine.runtime.keys import ClientKeys
    return ClientKeys.from_files(Path(server), Path(client))


@pytest.fixture(scope="session")
def lse_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The engine under test: the one at ``--lse-endpoint``, or one started for the session."""
    from engine.testing.engine import EngineUnderTest, start
    cfg = request.config
    keys = _keys(cfg)
    endpoint = cfg.getoption("--lse-endpoint")
    if endpoint:
        yield EngineUnderTest(endpoint, keys)
        return
    config = cfg.getoption("--lse-config")
    eng = start(Path(config) if config else None, tmp_path_factory.mktemp("lse-engine"), keys)
    try:
        yield eng
    finally:
        eng.stop()


@pytest.fixture
def lse_client(request: pytest.FixtureRequest, lse_engine):
    with lse_engine.client(request.config.getoption("--lse-timeout")) as c:
        yield c


@pytest.fixture
def lse_avatar(request: pytest.FixtureRequest, lse_client) -> str:
    """The avatar of ``--lse-avatar`` (or of ``@pytest.mark.parametrize("lse_avatar", [...],
    indirect=True)``), loaded before the test starts timing."""
    name = getattr(request, "param", None) or request.config.getoption("--lse-avatar")
    lse_client.load(name)
    return name


class Measure:
    """The measurements of :mod:`engine.testing.measure`, bound to this test's engine, client and
    ``benchmark`` fixture (one measurement per test, as pytest-benchmark allows)."""

    def __init__(self, engine: Any, client: Any, benchmark: Any) -> None:
        self.engine, self.client, self.benchmark = engine, client, benchmark

    def composite(self, avatar: str, batch_size: int = 12, rounds: int = 20, warmup: int = 2):
        from engine.testing.measure import composite_round_trip
        return composite_round_trip(self.client, avatar, batch_size, rounds, warmup, self.benchmark)

    def stream_latency(self, avatar: str, streams: int = 1, seconds: float = 6.0, processes: int = 1):
        from engine.testing.measure import stream_latency
        return stream_latency(self.engine, avatar, streams, seconds, processes, self.benchmark)

    def stream_throughput(self, avatar: str, streams: int = 4, seconds: float = 6.0, processes: int = 1):
        from engine.testing.measure import stream_throughput
        return stream_throughput(self.engine, avatar, streams, seconds, processes, self.benchmark)


@pytest.fixture
def lse_measure(lse_engine, lse_client, benchmark) -> Measure:
    return Measure(lse_engine, lse_client, benchmark)
