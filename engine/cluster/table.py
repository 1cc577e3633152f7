"""The router's state, without Ray: the hosts as their agents last reported them, the avatars it
placed recently, its counters and their Prometheus text. :mod:`engine.cluster.router` runs it in
a Ray Serve replica; tests drive it directly."""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

from engine.cluster.ranking import SLACK, HostView, NoHost, choose

STALE_S = 3.0                   # a host whose agent has not reported for this long takes nothing new
PLACED_S = 60.0                 # an avatar placed on a host counts as hot there for this long (it is loading)
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


@dataclass
class Host:
    view: HostView
    reported: float = 0.0                      # monotonic time of the last report
    error: str = ""                            # why the engine is not healthy, from the agent
    known: set[str] | None = None              # avatars its engine can load (None: not reported yet)
    server_key: str | None = None
    streams: int = 0
    gpus: int = 0
    resolved: int = 0                          # resolves answered with this host
    pending: int = 0                           # avatars placed here that its last report does not show hot
                                               # (recounted at each report, raised at each placement here)


@dataclass
class Table:
    slack: float = SLACK
    hosts: dict[str, Host] = field(default_factory=dict)
    placed: dict[str, tuple[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"hit": 0, "miss": 0, "no_host": 0, "unknown_model": 0,
                                                                      "starting": 0})
    latency: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    latency_sum: float = 0.0

    def update(self, report: dict[str, Any], now: float | None = None) -> None:
        """An agent's report (engine.cluster.agent.Agent.report)."""
        now = time.monotonic() if now is None else now
        name = report["host"]
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = Host(HostView(name))
        v = host.view
        v.endpoint, v.healthy, v.draining = report["endpoint"], bool(report["healthy"]), bool(report["draining"])
        v.load, v.free_bytes = float(report.get("load", 0.0)), int(report.get("free_bytes", 0))
        if report.get("hot") is not None:
            v.hot = set(report["hot"])
        if report.get("known") is not None:
            host.known = set(report["known"])
        host.error, host.server_key = report.get("error", ""), report.get("server_key")
        host.streams, host.gpus, host.reported = int(report.get("streams", 0)), int(report.get("gpus", 0)), now
        host.pending = 0
        for avatar, (where, when) in list(self.placed.items()):    # expired placements, once a report
            if now - when > PLACED_S:
                del self.placed[avatar]
            elif where == name and avatar not in v.hot:
                host.pending += 1

    def forget(self, name: str) -> None:
        self.hosts.pop(name, None)

    def views(self, now: float, avatar: str) -> list[HostView]:
        """Each host as the ranking sees it for ``avatar``: stale hosts unhealthy, and hot where the
        router placed it recently (its reported set is shared, not copied: a resolve is O(hosts))."""
        placed = self.placed.get(avatar)
        if placed is not None and now - placed[1] > PLACED_S:
            del self.placed[avatar]
            placed = None
        out = []
        for h in self.hosts.values():
            hot = h.view.hot | {avatar} if placed is not None and placed[0] == h.view.name else h.view.hot
            out.append(HostView(h.view.name, h.view.endpoint, h.view.healthy and now - h.reported <= STALE_S,
                                h.view.draining, h.view.load, h.view.free_bytes, hot, h.pending))
        return out

    def resolve(self, avatar: str, now: float | None = None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for a resolve of ``avatar``."""
        t0 = time.perf_counter()
        now = time.monotonic() if now is None else now
        try:
            if self.hosts and all(h.known is not None for h in self.hosts.values()) \
                    and not any(avatar in h.known for h in self.hosts.values()):          # type: ignore[operator]
                self.counts["unknown_model"] += 1
                return 404, {"error": "unknown_model", "message": f"no engine host has an avatar named {avatar!r}"}
            views = self.views(now, avatar)
            try:
                view, hot = choose(avatar, views, self.slack)
            except NoHost as e:
                self.counts["no_host"] += 1
                down = {h.name: self.hosts[h.name].error or ("no report for over %g s" % STALE_S)
                        for h in views if not h.healthy}
                return 503, {"error": "no_host", "message": f"{e} (known hosts: {len(views)}; down: {down})"}
            self.counts["hit" if hot else "miss"] += 1
            host = self.hosts[view.name]
            if not hot:
                self.placed[avatar] = (view.name, now)
                host.pending += 1
            host.resolved += 1
            return 200, {"avatar": avatar, "host": view.name, "endpoint": view.endpoint, "hot": hot,
                         "server_key": host.server_key}
        finally:
            dt = time.perf_counter() - t0
            self.latency[bisect.bisect_left(BUCKETS, dt)] += 1
            self.latency_sum += dt

    def status(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        placed = self.counts["hit"] + self.counts["miss"]
        return {
            "hosts": [{"host": h.view.name, "endpoint": h.view.endpoint,
                       "healthy": h.view.healthy and now - h.reported <= STALE_S, "error": h.error,
                       "draining": h.view.draining, "load": round(h.view.load, 3), "streams": h.streams,
                       "gpus": h.gpus, "free_bytes": h.view.free_bytes, "hot": sorted(h.view.hot),
                       "resolved": h.resolved, "report_age_s": round(now - h.reported, 2)}
                      for h in sorted(self.hosts.values(), key=lambda h: h.view.name)],
            "resolves": dict(self.counts),
            "hit_ratio": round(self.counts["hit"] / placed, 4) if placed else None,
            "slack": self.slack,
        }

    def metrics(self, now: float | None = None) -> str:
        """The router's series in Prometheus' text format."""
        st = self.status(now)
        out = ["# HELP lse_cluster_resolves_total Resolves answered, by result (hit: the host already held the avatar).",
               "# TYPE lse_cluster_resolves_total counter"]
        out += [f'lse_cluster_resolves_total{{result="{k}"}} {v}' for k, v in sorted(self.counts.items())]
        out += ["# HELP lse_cluster_resolve_seconds Time the router took to answer a resolve.",
                "# TYPE lse_cluster_resolve_seconds histogram"]
        acc = 0
        for le, n in zip([*map(str, BUCKETS), "+Inf"], self.latency):
            acc += n
            out.append(f'lse_cluster_resolve_seconds_bucket{{le="{le}"}} {acc}')
        out += [f"lse_cluster_resolve_seconds_sum {self.latency_sum:.6f}", f"lse_cluster_resolve_seconds_count {acc}"]
        series = (("up", "1 when the host's engine answers its agent and its report is fresh.", "healthy"),
                  ("draining", "1 when the host takes no new avatars.", "draining"),
                  ("load", "Busy units per GPU (streams and batches) at its last report.", "load"),
                  ("hot_avatars", "Avatars loaded on the host.", "hot"),
                  ("free_bytes", "Shared memory its engine can still give to backgrounds.", "free_bytes"),
                  ("resolved_total", "Resolves answered with this host.", "resolved"))
        for name, help_, key in series:
            kind = "counter" if name.endswith("_total") else "gauge"
            out += [f"# HELP lse_cluster_host_{name} {help_}", f"# TYPE lse_cluster_host_{name} {kind}"]
            for h in st["hosts"]:
                v = h[key]
                v = len(v) if isinstance(v, list) else int(v) if isinstance(v, bool) else v
                out.append(f'lse_cluster_host_{name}{{host="{h["host"]}"}} {v}')
        return "\n".join(out) + "\n"
