#!/usr/bin/env python3
"""Placement simulation: which host should an avatar's request go to, among many engine hosts?

A discrete-event simulation of requests for many avatars over many hosts, one engine per host. It
prints, per placement policy and Zipf exponent, the share of requests that land where the avatar is
already hot (a "hit") and how unevenly the hosts are loaded, next to the static bound. The affinity
policy is the router's own ranking, :func:`engine.cluster.ranking.choose`, called with
:class:`~engine.cluster.ranking.HostView` objects, so the simulation measures the router's code::

    python tools/placement_sim.py [--quick] [--avatars N --hosts N --requests N --seed N ...] [--json FILE]

The model (every number is a flag; the defaults are the issue's parameters):

* avatars: 11,000, each a clip of 10-30 s (uniform) of 25 fps video at 0.2 MB per 720p frame in
  shared memory (50-150 MB, 100 MB on average); popularity is Zipf with exponent s over a fixed rank
  order, clip length independent of rank.
* hosts: 8, each with 4 GPUs and 64 GB of shared memory for backgrounds; resident networks either
  bounded (32 per GPU, pooled per host: 128) or unbounded.
* requests: Poisson arrivals at 0.5 per host per second (4/s for 8 hosts); 25% are live streams of
  120 s, the rest batch requests of 2-6 s (uniform). A request occupies one busy unit on its host
  for its duration, plus 3 s of loading on a miss.
* hit: the avatar is hot on the chosen host (backgrounds in its shared memory and its network
  resident; both load and leave together). A miss loads it there, evicting least recently used
  avatars that no request is using, until its bytes and (when bounded) a network slot fit. Every
  policy sees a placement as hot at once (the router remembers its own placements until the next
  report); the policies that read host state read it exact and current.
* load: a host's busy time over the counted requests (the sum of their durations and loads);
  "busiest/mean" is the largest host's over the mean. The ranking's load is the host's open
  requests per GPU at the moment of the choice.

Policies:

* random: a uniformly random host.
* round-robin: hosts in turn (the seed's nginx in front of many servers).
* multiplex: Ray Serve's stock model multiplexing (its power-of-two-choices router with a
  multiplexed model id): candidates are the replicas (hosts) holding the avatar; with none, the
  replicas with the fewest loaded models; two of the candidates drawn at random, the one with the
  shorter queue (open requests) wins; a replica at ``max_ongoing_requests`` (GPUs x 8 here) takes
  nothing while another can. Where Ray would back off and retry (holders all full: after a 1-2 s matching timeout it
  falls back to the fewest-models replicas), the simulation falls back at once to the non-full
  replicas with the fewest models; such fallbacks are counted. The engine's memory, not
  ``max_num_models_per_replica``, decides evictions.
* affinity: ``choose(avatar, hosts, slack)``: holders first unless their load exceeds the least
  loaded host's by more than the slack (2 busy units per GPU), else the least loaded, more free
  bytes on a tie (the router first breaks a tie by placements its reports do not show yet; the
  simulation's reports are instant, so none is pending).
* static bound: the share of requests for the most popular avatars that fit in all hosts' shared
  memory together (and, for bounded networks, in all their network slots), in rank order: the hit
  ratio of placing exactly those, one copy each, and sending every request to its avatar's host
  whatever the load. (Ranking by popularity per byte would fit a little more: about a point here.)

Each run makes ``--warmup`` requests first (hosts start empty; not counted), then ``--requests``
counted ones. Every policy sees the same request sequence; results depend only on the flags and
``--seed``. ``--quick`` is the same cluster with 30,000 warm-up and 30,000 counted requests (hit
ratios within 2 points of the full form's; the multiplex model's imbalance varies more), seconds
instead of about half a minute; the test suite runs it.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.cluster.ranking import SLACK, HostView, choose  # noqa: E402

POLICIES = ("random", "round-robin", "multiplex", "affinity")


@dataclass(frozen=True)
class Params:
    avatars: int = 11_000
    hosts: int = 8
    gpus: int = 4                       # per host
    shm_gb: float = 64.0                # shared memory for backgrounds, per host (GB = 1e9 bytes)
    slots: int = 32                     # resident networks per GPU, in the "bounded" rows
    frame_mb: float = 0.2               # one 720p frame in shared memory (MB = 1e6 bytes)
    fps: int = 25
    clip_s: tuple[float, float] = (10.0, 30.0)    # avatar clip length, uniform
    stream_share: float = 0.25
    stream_s: float = 120.0
    batch_s: tuple[float, float] = (2.0, 6.0)     # batch request duration, uniform
    load_s: float = 3.0                 # extra busy time of a miss (network + backgrounds)
    rate: float = 0.0                   # requests per second, all hosts; 0: 0.5 per host
    gpu_units: int = 8                  # busy units a GPU serves: multiplex's max_ongoing_requests / GPU
    slack: float = SLACK
    warmup: int = 100_000
    requests: int = 150_000
    zipf: tuple[float, ...] = (0.8, 1.0, 1.2)
    seed: int = 1

    @property
    def arrival_rate(self) -> float:
        return self.rate or 0.5 * self.hosts


QUICK = dict(warmup=30_000, requests=30_000)


def avatar_bytes(p: Params) -> np.ndarray:
    rng = np.random.default_rng([p.seed, 0])
    frames = np.rint(rng.uniform(*p.clip_s, p.avatars) * p.fps)
    return (frames * p.frame_mb * 1e6).astype(np.int64)


def popularity(p: Params, s: float) -> np.ndarray:
    w = np.arange(1, p.avatars + 1, dtype=float) ** -s
    return w / w.sum()


def workload(p: Params, s: float):
    """The request sequence for exponent ``s``: arrival times, avatars, durations (lists)."""
    rng = np.random.default_rng([p.seed, 1, round(s * 1000)])
    n = p.warmup + p.requests
    times = np.cumsum(rng.exponential(1.0 / p.arrival_rate, n))
    avatars = rng.choice(p.avatars, n, p=popularity(p, s))
    dur = np.where(rng.random(n) < p.stream_share, p.stream_s, rng.uniform(*p.batch_s, n))
    return times.tolist(), avatars.tolist(), dur.tolist()


def static_bound(p: Params, s: float, sizes: np.ndarray, bounded: bool) -> float:
    fit = int(np.searchsorted(np.cumsum(sizes), p.hosts * p.shm_gb * 1e9, side="right"))
    if bounded:
        fit = min(fit, p.hosts * p.gpus * p.slots)
    return float(popularity(p, s)[:fit].sum())


class Host:
    """One engine host: avatars hot in LRU order, those in use, open requests, busy time."""
    __slots__ = ("cap_bytes", "cap_slots", "lru", "hot", "in_use", "used", "open", "busy", "view")

    def __init__(self, name: str, cap_bytes: int, cap_slots: float):
        self.cap_bytes, self.cap_slots = cap_bytes, cap_slots
        self.lru: OrderedDict[str, int] = OrderedDict()   # avatar -> bytes, least recently used first
        self.hot: set[str] = set()
        self.in_use: dict[str, int] = {}
        self.used = self.open = 0
        self.busy = 0.0
        self.view = HostView(name, endpoint=f"tcp://{name}:5555", hot=self.hot)

    def place(self, avatar: str, nbytes: int) -> tuple[bool, bool]:
        """Start a request for ``avatar`` here: (hit, fits without overcommitting)."""
        fits = True
        if avatar in self.hot:
            self.lru.move_to_end(avatar)
            hit = True
        else:
            fits = self._make_room(nbytes)
            self.lru[avatar] = nbytes
            self.hot.add(avatar)
            self.used += nbytes
            hit = False
        self.in_use[avatar] = self.in_use.get(avatar, 0) + 1
        self.open += 1
        return hit, fits

    def _make_room(self, nbytes: int) -> bool:
        used, count, victims = self.used, len(self.lru), []
        for avatar, b in self.lru.items():
            if used + nbytes <= self.cap_bytes and count < self.cap_slots:
                break
            if avatar not in self.in_use:
                victims.append(avatar)
                used -= b
                count -= 1
        for avatar in victims:
            del self.lru[avatar]
            self.hot.discard(avatar)
        self.used = used
        return used + nbytes <= self.cap_bytes and count < self.cap_slots

    def release(self, avatar: str) -> None:
        left = self.in_use[avatar] - 1
        if left:
            self.in_use[avatar] = left
        else:
            del self.in_use[avatar]
        self.lru.move_to_end(avatar)
        self.open -= 1


def make_policy(policy: str, hosts: list[Host], p: Params, rnd: random.Random, stats: dict):
    """``pick(avatar) -> host index`` for one policy over ``hosts``."""
    n = len(hosts)
    max_ongoing = p.gpus * p.gpu_units
    if policy == "random":
        return lambda avatar: rnd.randrange(n)
    if policy == "round-robin":
        turn = itertools.cycle(range(n))
        return lambda avatar: next(turn)
    if policy == "affinity":
        views = [h.view for h in hosts]
        index = {v.name: i for i, v in enumerate(views)}

        def affinity(avatar: str) -> int:
            for h in hosts:
                h.view.load = h.open / p.gpus
                h.view.free_bytes = max(0, h.cap_bytes - h.used)
            return index[choose(avatar, views, p.slack)[0].name]
        return affinity
    if policy == "multiplex":
        def multiplex(avatar: str) -> int:
            cands = [i for i, h in enumerate(hosts) if avatar in h.hot and h.open < max_ongoing]
            if not cands:
                if any(avatar in h.hot for h in hosts):
                    stats["fallbacks"] += 1         # holders all full: Ray's matching timeout, then this
                free = [i for i, h in enumerate(hosts) if h.open < max_ongoing] or list(range(n))
                fewest = min(len(hosts[i].lru) for i in free)
                cands = [i for i in free if len(hosts[i].lru) == fewest]
            if len(cands) == 1:
                return cands[0]
            a, b = rnd.sample(cands, 2)
            return a if hosts[a].open <= hosts[b].open else b
        return multiplex
    raise ValueError(f"unknown policy {policy!r}")


def simulate(p: Params, s: float, policy: str, bounded: bool, work, sizes: list[int]) -> dict:
    times, avatars, durs = work
    names = [f"a{i}" for i in range(p.avatars)]
    cap_slots = p.gpus * p.slots if bounded else math.inf
    hosts = [Host(f"host{i}", int(p.shm_gb * 1e9), cap_slots) for i in range(p.hosts)]
    rnd = random.Random(f"{p.seed}/{s}/{policy}/{bounded}")
    stats = {"fallbacks": 0}
    pick = make_policy(policy, hosts, p, rnd, stats)
    max_ongoing = p.gpus * p.gpu_units
    ends: list[tuple[float, int, int, str]] = []
    hits = overfull = overcommit = open_sum = total_open = 0
    for j, (t, a, dur) in enumerate(zip(times, avatars, durs)):
        while ends and ends[0][0] <= t:
            _, _, i, avatar = heapq.heappop(ends)
            hosts[i].release(avatar)
            total_open -= 1
        avatar = names[a]
        i = pick(avatar)
        h = hosts[i]
        full = h.open >= max_ongoing
        hit, fits = h.place(avatar, sizes[a])
        busy = dur if hit else dur + p.load_s
        heapq.heappush(ends, (t + busy, j, i, avatar))
        total_open += 1
        if j >= p.warmup:
            hits += hit
            h.busy += busy
            overfull += full
            overcommit += not fits
            open_sum += total_open
    busy = [h.busy for h in hosts]
    return {"policy": policy, "networks": "bounded" if bounded else "unbounded", "zipf": s,
            "hit": hits / p.requests, "imbalance": max(busy) / (sum(busy) / len(busy)),
            "mean_load_per_gpu": open_sum / p.requests / (p.hosts * p.gpus),
            "placed_on_full_host": overfull / p.requests, "overcommitted_loads": overcommit,
            "multiplex_fallbacks": stats["fallbacks"]}


def run(p: Params, policies=POLICIES, log=print) -> dict:
    sizes = avatar_bytes(p)
    rows, bounds = [], {}
    for s in p.zipf:
        work = workload(p, s)
        for bounded in (True, False):
            bound = static_bound(p, s, sizes, bounded)
            bounds[f"{'bounded' if bounded else 'unbounded'}/{s}"] = bound
            for policy in policies:
                t0 = time.perf_counter()
                row = simulate(p, s, policy, bounded, work, sizes.tolist())
                row.update(bound=bound, of_bound=row["hit"] / bound, wall_s=time.perf_counter() - t0)
                rows.append(row)
                log(f"  s={s} {policy:<11} networks {row['networks']:<9} hits {row['hit']:6.1%} "
                    f"({row['of_bound']:6.1%} of bound) busiest/mean {row['imbalance']:.3f} "
                    f"[{row['wall_s']:.1f} s]")
    return {"params": asdict(p), "mean_avatar_mb": float(sizes.mean() / 1e6), "bounds": bounds, "rows": rows}


def table(result: dict) -> str:
    p = result["params"]
    zipf = p["zipf"]
    head = "| policy | networks | " + " | ".join(
        f"s={s}: hits | % of bound | busiest/mean" for s in zipf) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(zipf))]
    rows = result["rows"]
    for net in ("bounded", "unbounded"):
        label = f"{p['slots']}/GPU" if net == "bounded" else "unbounded"
        for policy in dict.fromkeys(r["policy"] for r in rows):
            cells = []
            for s in zipf:
                r = next(r for r in rows if r["policy"] == policy and r["networks"] == net and r["zipf"] == s)
                cells += [f"{r['hit']:.1%}", f"{r['of_bound']:.1%}", f"{r['imbalance']:.2f}"]
            lines.append(f"| {policy} | {label} | " + " | ".join(cells) + " |")
        bound = [f"{result['bounds'][f'{net}/{s}']:.1%} | 100% | -" for s in zipf]
        lines.append(f"| static bound | {label} | " + " | ".join(bound) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    d = Params()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small cluster, seconds (the tests' form)")
    for f in ("avatars", "hosts", "gpus", "slots", "gpu_units", "warmup", "requests", "seed"):
        ap.add_argument("--" + f.replace("_", "-"), type=int)
    for f in ("shm_gb", "frame_mb", "stream_share", "stream_s", "load_s", "rate", "slack"):
        ap.add_argument("--" + f.replace("_", "-"), type=float)
    ap.add_argument("--fps", type=int)
    ap.add_argument("--clip-s", type=float, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--batch-s", type=float, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--zipf", type=float, nargs="+", metavar="S")
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    ap.add_argument("--json", type=Path, metavar="FILE", help="write parameters and rows as JSON")
    args = ap.parse_args(argv)
    p = replace(d, **QUICK) if args.quick else d
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()
             if k in Params.__dataclass_fields__ and v is not None}
    p = replace(p, **given)
    print(f"{p.avatars} avatars ({avatar_bytes(p).mean() / 1e6:.0f} MB mean) over {p.hosts} hosts x "
          f"{p.gpus} GPUs, {p.shm_gb:g} GB each; {p.arrival_rate:g} requests/s, {p.stream_share:.0%} "
          f"streams of {p.stream_s:g} s; {p.warmup} warm-up + {p.requests} counted requests; seed {p.seed}")
    t0 = time.perf_counter()
    result = run(p, tuple(args.policies))
    result["wall_s"] = time.perf_counter() - t0
    loads = [r["mean_load_per_gpu"] for r in result["rows"]]
    print(f"\nmean load {min(loads):.2f}-{max(loads):.2f} busy units per GPU "
          f"(multiplex's max_ongoing_requests: {p.gpu_units} per GPU); wall {result['wall_s']:.1f} s\n")
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
