"""What CURVE costs the transport alone: one composite-sized round trip (a 24-frame request's audio
features out, 24 JPEGs of a 1280x720 avatar back) between a DEALER and a ROUTER over TCP loopback,
plain beside CURVE, in the same run. The engine-level figure is ``tools/curve_bench.sh``.

    tools/dev test tests/bench/test_bench_curve.py --benchmark-enable --benchmark-columns=min,median,max,ops
"""
from __future__ import annotations

import pytest
import zmq

from engine.runtime.keys import ClientKeys

pytestmark = pytest.mark.benchmark(group="transport-composite-24")

REQUEST = [b"", b"{}" * 100, bytes(24 * 32 * 16 * 16 * 4)]          # header + audio_features [24,32,16,16]
REPLY = [b"{}" * 200] + [bytes(52 * 1024)] * 24                     # header + 24 JPEGs of ~52 KB


@pytest.fixture(params=["plain", "curve"])
def pair(request):
    ctx = zmq.Context()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    if request.param == "curve":
        spub, ssec = zmq.curve_keypair()
        server.curve_server = True
        server.curve_secretkey = ssec
        ClientKeys.ephemeral(spub).apply(client)      # no ZAP handler in this context: any key is accepted
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client.connect(f"tcp://127.0.0.1:{port}")
    yield server, client
    server.close(0)
    client.close(0)
    ctx.term()


def test_round_trip(benchmark, pair):
    server, client = pair

    def once() -> int:
        client.send_multipart(REQUEST, copy=False)
        ident, *_ = server.recv_multipart(copy=False)
        server.send_multipart([ident.bytes, b"", *REPLY], copy=False)
        return len(client.recv_multipart(copy=False))
    assert benchmark(once) == 26
