"""Where an avatar should go: the router's policy, pure (no Ray, no I/O), so the placement
simulation (tools/placement_sim.py) ranks with the very same code.

Holders first: a host where the avatar is already hot (backgrounds in shared memory, network
resident) wins unless its load exceeds the least loaded host's by more than ``slack``; among those
the least loaded. Otherwise the least loaded host; on a tie, the one with fewer pending placements
(avatars the router sent there that its agent's last report does not list yet as loaded or loading:
a burst of new avatars spreads over the hosts instead of following a free-bytes figure that has not
caught up), then the one with more free bytes (a load there evicts less). Unhealthy and draining
hosts take nothing new.

Load is in "busy units per GPU" (open streams and batches in flight or queued, divided by the
host's GPU workers), so hosts of different sizes compare; ``slack`` is in the same units.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SLACK = 2.0                     # two more busy units per GPU than the least loaded host is still "balanced"


class NoHost(LookupError):
    """No healthy, undrained host is known."""


@dataclass
class HostView:
    """What the router knows of one host (from its agent's last report)."""
    name: str
    endpoint: str = ""
    healthy: bool = True
    draining: bool = False
    load: float = 0.0                           # busy units per GPU
    free_bytes: int = 0                         # shared memory its engine can still give to backgrounds
    hot: set[str] = field(default_factory=set)  # avatars loaded there
    pending: int = 0                            # avatars placed there that its last report does not show yet

    @property
    def takes_work(self) -> bool:
        return self.healthy and not self.draining


def choose(avatar: str, hosts: list[HostView], slack: float = SLACK) -> tuple[HostView, bool]:
    """The host for ``avatar`` and whether it is already hot there; :class:`NoHost` when none takes work."""
    live = [h for h in hosts if h.takes_work]
    if not live:
        raise NoHost("no healthy engine host is available" if not any(h.healthy for h in hosts)
                     else "every healthy engine host is draining")
    least = min(h.load for h in live)
    holders = [h for h in live if avatar in h.hot and h.load <= least + slack]
    if holders:
        return min(holders, key=lambda h: (h.load, h.name)), True
    return min(live, key=lambda h: (h.load, h.pending, -h.free_bytes, h.name)), False
