"""engine.cluster.ranking.choose: the router's placement policy, pure."""
from __future__ import annotations

import pytest

from engine.cluster.ranking import SLACK, HostView, NoHost, choose


def host(name, load=0.0, free=0, hot=(), **kw):
    return HostView(name, endpoint=f"tcp://{name}:5555", load=load, free_bytes=free, hot=set(hot), **kw)


def test_a_holder_wins_over_a_less_loaded_host():
    hosts = [host("a", load=0.0, free=10**9), host("b", load=0.8, hot={"x"})]
    chosen, hot = choose("x", hosts)
    assert (chosen.name, hot) == ("b", True)


def test_the_least_loaded_holder_among_several():
    hosts = [host("a", load=0.9, hot={"x"}), host("b", load=0.4, hot={"x"}), host("c", load=0.0)]
    assert choose("x", hosts) == (hosts[1], True)


def test_slack_bounds_how_much_busier_a_holder_may_be():
    holder, idle = host("h", load=1.5, hot={"x"}), host("i", load=0.5)
    assert choose("x", [holder, idle], slack=1.0) == (holder, True)        # exactly least + slack: still taken
    assert choose("x", [holder, idle], slack=0.99) == (idle, False)
    holder.load = 2.6
    assert choose("x", [holder, idle]) == (idle, False)                    # default slack is 2 units per GPU
    assert SLACK == 2.0
    assert choose("x", [holder, idle], slack=2.5) == (holder, True)


def test_without_holders_the_least_loaded_host():
    hosts = [host("a", load=2.0, free=10**10, hot={"y"}), host("b", load=0.5), host("c", load=1.0)]
    assert choose("x", hosts) == (hosts[1], False)


def test_free_bytes_break_a_load_tie_then_the_name():
    hosts = [host("a", load=1.0, free=10), host("b", load=1.0, free=30), host("c", load=1.0, free=20)]
    assert choose("x", hosts)[0].name == "b"
    tie = [host("z", load=1.0, free=5), host("m", load=1.0, free=5)]
    assert choose("x", tie)[0].name == "m"
    holders = [host("z", load=0.5, hot={"x"}), host("m", load=0.5, hot={"x"})]
    assert choose("x", holders) == (holders[1], True)


def test_placements_still_loading_break_a_load_tie_before_free_bytes():
    hosts = [host("a", free=30, pending=2), host("b", free=10, pending=1), host("c", free=20, pending=1)]
    assert choose("x", hosts) == (hosts[2], False)
    hosts[1].load = 0.5                                                    # load still comes first
    assert choose("x", hosts) == (hosts[2], False)
    hosts[2].load = 0.5
    assert choose("x", hosts) == (hosts[0], False)
    holder = host("h", free=0, pending=9, hot={"x"})                       # and a holder is still a holder
    assert choose("x", [*hosts, holder]) == (holder, True)


@pytest.mark.parametrize("flag", [{"healthy": False}, {"draining": True}])
def test_unhealthy_and_draining_hosts_take_nothing_new(flag):
    out = host("out", load=0.0, free=10**12, hot={"x"}, **flag)
    other = host("other", load=3.0)
    assert choose("x", [out, other]) == (other, False)
    assert choose("y", [out, other]) == (other, False)


def test_an_out_of_service_host_does_not_set_the_least_load():
    # a draining host at load 0 must not make a busier holder look "over the slack"
    hosts = [host("d", load=0.0, draining=True), host("h", load=2.5, hot={"x"}), host("o", load=2.0)]
    assert choose("x", hosts) == (hosts[1], True)


def test_no_host_messages():
    with pytest.raises(NoHost, match="no healthy engine host is available"):
        choose("x", [])
    with pytest.raises(NoHost, match="no healthy engine host is available"):
        choose("x", [host("a", healthy=False), host("b", healthy=False, draining=True)])
    with pytest.raises(NoHost, match="every healthy engine host is draining"):
        choose("x", [host("a", healthy=False), host("b", draining=True)])
    assert issubclass(NoHost, LookupError)
