"""The router's state without Ray (engine.cluster.table.Table): hosts made from their agents'
reports, stale reports, recent placements counted hot for PLACED_S, unknown_model and no_host
answers, hit/miss counting and the Prometheus text of /metrics. Pure: times are passed as ``now``."""
from __future__ import annotations

import re

from engine.cluster.table import BUCKETS, PLACED_S, STALE_S, Table

T0 = 1000.0


def rep(host: str, **kw) -> dict:
    """A healthy agent report (the shape of engine.cluster.agent.report_from)."""
    out = {"host": host, "endpoint": f"tcp://{host}.example:5555", "server_key": None, "draining": False,
           "healthy": True, "error": "", "load": 0.0, "gpus": 1, "streams": 0, "free_bytes": 1000,
           "hot": [], "known": ["a", "b", "c"]}
    out.update(kw)
    return out


def table(*reports: dict, now: float = T0) -> Table:
    t = Table()
    for r in reports:
        t.update(r, now=now)
    return t


def host_status(t: Table, name: str, now: float) -> dict:
    return next(h for h in t.status(now)["hosts"] if h["host"] == name)


def test_a_report_makes_a_host_that_resolves_take():
    t = table()
    assert t.status(T0)["hosts"] == []
    t.update(rep("h0", load=0.5, streams=2, gpus=4, free_bytes=777, hot=["b", "a"], server_key="K" * 40), now=T0)
    h = host_status(t, "h0", T0 + 1)
    assert h == {"host": "h0", "endpoint": "tcp://h0.example:5555", "healthy": True, "error": "", "draining": False,
                 "load": 0.5, "streams": 2, "gpus": 4, "free_bytes": 777, "hot": ["a", "b"], "resolved": 0,
                 "report_age_s": 1.0}
    code, body = t.resolve("a", now=T0 + 1)
    assert (code, body) == (200, {"avatar": "a", "host": "h0", "endpoint": "tcp://h0.example:5555", "hot": True,
                                  "server_key": "K" * 40})
    assert host_status(t, "h0", T0 + 1)["resolved"] == 1
    # a second report of the same host replaces the first, it does not add a host
    t.update(rep("h0", endpoint="tcp://h0.example:6000", hot=["c"]), now=T0 + 2)
    assert [h["host"] for h in t.status(T0 + 2)["hosts"]] == ["h0"]
    assert t.resolve("c", now=T0 + 2)[1]["endpoint"] == "tcp://h0.example:6000"


def test_a_stale_host_takes_nothing_new_and_shows_unhealthy():
    t = table(rep("h0", hot=["a"]), rep("h1", free_bytes=10))
    fresh, stale = T0 + STALE_S - 0.1, T0 + STALE_S + 0.1
    assert host_status(t, "h0", fresh)["healthy"] is True
    assert t.resolve("a", now=fresh)[1]["host"] == "h0"            # the holder
    t.update(rep("h1", free_bytes=10), now=stale)                  # h1 keeps reporting, h0 stops
    assert host_status(t, "h0", stale)["healthy"] is False
    assert host_status(t, "h1", stale)["healthy"] is True
    code, body = t.resolve("a", now=stale)
    assert (code, body["host"], body["hot"]) == (200, "h1", False)
    # nobody reports any more: no host at all, and the message says why
    code, body = t.resolve("b", now=stale + STALE_S + 1)
    assert code == 503 and body["error"] == "no_host"
    assert f"no report for over {STALE_S:g} s" in body["message"] and "'h0'" in body["message"]
    # a fresh report brings it back
    t.update(rep("h0", hot=["a"]), now=stale + STALE_S + 1)
    assert t.resolve("a", now=stale + STALE_S + 1)[1]["host"] == "h0"


def test_a_placement_counts_as_hot_there_for_placed_s_then_expires():
    t = table(rep("h0", free_bytes=100), rep("h1", free_bytes=200))
    code, body = t.resolve("a", now=T0)
    assert (code, body["host"], body["hot"]) == (200, "h1", False)      # a miss: the host with more free bytes
    # h0 now has more free bytes (a miss would go there) but h1 is loading "a": it stays there, as a hit,
    # although no report of h1 says "a" is hot yet
    def refresh(now: float) -> None:
        t.update(rep("h0", free_bytes=500), now=now)
        t.update(rep("h1", free_bytes=200), now=now)
    for dt in (1.0, PLACED_S / 2, PLACED_S - 1):
        refresh(T0 + dt)
        code, body = t.resolve("a", now=T0 + dt)
        assert (body["host"], body["hot"]) == ("h1", True), dt
    refresh(T0 + PLACED_S + 1)
    code, body = t.resolve("a", now=T0 + PLACED_S + 1)
    assert (body["host"], body["hot"]) == ("h0", False)                 # expired: placed anew, on h0
    refresh(T0 + PLACED_S + 2)
    assert t.resolve("a", now=T0 + PLACED_S + 2)[1]["host"] == "h0"


def test_a_burst_of_new_avatars_spreads_before_the_reports_catch_up():
    # every host reports the same, then five cold resolves come before any new report: the hosts take
    # them in turn, not all the one with the most free bytes (the cluster test once put 15 of 30 on one)
    def r(host: str, **kw) -> dict:
        return rep(host, known=list("abcdefg"), **kw)
    t = table(r("h0", free_bytes=1000), r("h1", free_bytes=1001), r("h2", free_bytes=999))
    hosts = [t.resolve(a, now=T0 + 0.1)[1]["host"] for a in ("a", "b", "c", "d", "e")]
    assert hosts == ["h1", "h0", "h2", "h1", "h0"]
    # h1's report shows "a" loaded (less free) and "d" still loading; h0 and h2 have not reported:
    # h1 has one pending, h0 two, h2 one, so h2 (more free bytes than h1 now) takes the next
    t.update(r("h1", free_bytes=900, hot=["a"]), now=T0 + 0.5)
    assert t.resolve("f", now=T0 + 0.6)[1]["host"] == "h2"
    # once the reports show every load, free bytes decide again
    t.update(r("h0", free_bytes=800, hot=["b", "e"]), now=T0 + 1)
    t.update(r("h1", free_bytes=700, hot=["a", "d"]), now=T0 + 1)
    t.update(r("h2", free_bytes=750, hot=["c", "f"]), now=T0 + 1)
    assert [t.resolve(a, now=T0 + 1.1)[1] for a in ("a", "b", "c")] == [
        {"avatar": a, "host": h, "endpoint": f"tcp://{h}.example:5555", "hot": True, "server_key": None}
        for a, h in (("a", "h1"), ("b", "h0"), ("c", "h2"))]
    assert t.resolve("g", now=T0 + 1.1)[1]["host"] == "h0"


def test_unknown_model_only_when_every_host_reported_its_avatars_and_none_has_it():
    t = Table()
    code, body = t.resolve("z", now=T0)
    assert (code, body["error"]) == (503, "no_host")                  # no host at all: not "unknown"
    t.update(rep("h0", known=["a"]), now=T0)
    t.update(rep("h1", known=None), now=T0)                            # h1 has not said what it can load yet
    code, body = t.resolve("z", now=T0)
    assert code == 200 and body["host"] in ("h0", "h1")
    t.update(rep("h1", known=["b"]), now=T0 + 1)
    code, body = t.resolve("z", now=T0 + 1)
    assert (code, body["error"]) == (404, "unknown_model")
    assert "'z'" in body["message"]
    assert t.resolve("b", now=T0 + 1)[0] == 200                        # known on one host is enough
    assert t.resolve("a", now=T0 + 1)[0] == 200
    # a report without the list (the agent could not ask its engine) keeps the one reported before
    t.update(rep("h1", known=None, healthy=False, error="down"), now=T0 + 2)
    assert t.resolve("b", now=T0 + 2)[0] == 200
    assert t.resolve("z", now=T0 + 2)[0] == 404


def test_no_host_when_all_are_down_or_all_draining():
    t = table(rep("h0", healthy=False, error="the engine at tcp://h0.example:5555 did not answer: timeout"),
              rep("h1", healthy=False, error="the engine is not healthy"))
    code, body = t.resolve("a", now=T0)
    assert code == 503 and body["error"] == "no_host"
    assert "no healthy engine host is available" in body["message"]
    assert "known hosts: 2" in body["message"]
    assert "tcp://h0.example:5555 did not answer" in body["message"] and "the engine is not healthy" in body["message"]

    t = table(rep("h0", draining=True, hot=["a"]), rep("h1", draining=True))
    code, body = t.resolve("a", now=T0)
    assert (code, body["error"]) == (503, "no_host")
    assert "every healthy engine host is draining" in body["message"]
    assert t.status(T0)["resolves"]["no_host"] == 1

    # one down, one draining: still no host, and the message says the healthy one drains
    t = table(rep("h0", healthy=False, error="gone"), rep("h1", draining=True))
    code, body = t.resolve("a", now=T0)
    assert code == 503 and "draining" in body["message"] and "gone" in body["message"]
    # undrained: it takes work again
    t.update(rep("h1"), now=T0 + 1)
    assert t.resolve("a", now=T0 + 1)[1]["host"] == "h1"


def test_hits_misses_and_the_hit_ratio():
    t = table(rep("h0", hot=["a"]), rep("h1", known=["a", "b", "c"]))
    assert t.status(T0)["hit_ratio"] is None
    seq = ["a", "a", "b", "b", "b", "c", "zz"]                 # zz: unknown, not in the ratio
    got = [t.resolve(x, now=T0)[1].get("hot") for x in seq]
    assert got == [True, True, False, True, True, False, None]
    st = t.status(T0)
    assert st["resolves"] == {"hit": 4, "miss": 2, "no_host": 0, "unknown_model": 1, "starting": 0}
    assert st["hit_ratio"] == round(4 / 6, 4)
    assert sum(h["resolved"] for h in st["hosts"]) == 6
    t2 = table(rep("h0", healthy=False))
    t2.resolve("a", now=T0)
    assert t2.status(T0)["hit_ratio"] is None and t2.status(T0)["resolves"]["no_host"] == 1


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample line as (name, labels, value); fails on a line that is not one."""
    out = []
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) lse_cluster_\w+ .+$", line), line
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        name, labels, value = m.groups()
        pairs = LABEL.findall(labels or "")
        assert ",".join(f'{k}="{v}"' for k, v in pairs) == (labels or ""), f"bad labels: {line!r}"
        out.append((name, dict(pairs), float(value)))
    return out


def test_metrics_text_parses_and_agrees_with_the_counts():
    t = table(rep("h0", hot=["a", "b"], load=1.5, free_bytes=123), rep("h1", draining=True, gpus=2))
    t.update(rep("h2"), now=T0 - STALE_S - 5)                   # stale: up 0
    for x in ["a", "a", "c", "b", "zz"]:
        t.resolve(x, now=T0)
    text = t.metrics(T0)
    samples = parse(text)
    assert not any({"job", "instance"} & set(labels) for _, labels, _ in samples)   # Prometheus owns those
    # every family has its TYPE line before its samples
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif not line.startswith("#"):
            name = SAMPLE.match(line).group(1)
            family = re.sub(r"_(bucket|sum|count)$", "", name) if types.get(name) is None else name
            assert family in typed, f"{line!r} comes before its TYPE line"

    def value(name: str, **labels: str) -> float:
        [v] = [v for n, ls, v in samples if n == name and ls == labels]
        return v

    resolves = 5
    st = t.status(T0)
    for result, n in st["resolves"].items():
        assert value("lse_cluster_resolves_total", result=result) == n
    assert sum(v for n, _, v in samples if n == "lse_cluster_resolves_total") == resolves
    buckets = [(ls["le"], v) for n, ls, v in samples if n == "lse_cluster_resolve_seconds_bucket"]
    assert [le for le, _ in buckets] == [*map(str, BUCKETS), "+Inf"]
    assert [float(le) for le, _ in buckets[:-1]] == sorted(float(le) for le, _ in buckets[:-1])
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert counts[-1] == value("lse_cluster_resolve_seconds_count") == resolves
    assert 0 < value("lse_cluster_resolve_seconds_sum") < 1
    assert types["lse_cluster_resolve_seconds"] == "histogram"
    assert types["lse_cluster_resolves_total"] == "counter"

    assert {h: value("lse_cluster_host_up", host=h) for h in ("h0", "h1", "h2")} == {"h0": 1, "h1": 1, "h2": 0}
    assert {h: value("lse_cluster_host_draining", host=h) for h in ("h0", "h1", "h2")} == {"h0": 0, "h1": 1, "h2": 0}
    assert value("lse_cluster_host_load", host="h0") == 1.5
    assert value("lse_cluster_host_free_bytes", host="h0") == 123
    assert value("lse_cluster_host_hot_avatars", host="h0") == 2
    assert sum(value("lse_cluster_host_resolved_total", host=h) for h in ("h0", "h1", "h2")) == 4  # hits + misses
    assert types["lse_cluster_host_resolved_total"] == "counter" and types["lse_cluster_host_up"] == "gauge"


def test_metrics_of_an_empty_table_parse():
    samples = parse(Table().metrics(T0))
    assert [v for n, _, v in samples if n == "lse_cluster_resolve_seconds_count"] == [0]
    assert not any(n.startswith("lse_cluster_host_") for n, _, _ in samples)
