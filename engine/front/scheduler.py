"""What runs next: batch requests and live-stream frames onto the GPU workers' ring slots.

Pure policy, in the manner of vLLM's scheduler: no sockets, no threads, no clock of its own. The
front feeds it (queued batch requests, open streams, each GPU worker's free slots and loaded
networks, the current time) and calls :meth:`Scheduler.schedule` after every turn of its loop,
whatever happened (a freed slot, a delivered frame, a push, a worker coming back), so nothing that
gates a decision can change without the scheduler being asked again. It returns the jobs to start;
the front starts them. Tested on its own with simulated time (``tests/front/test_scheduler.py``).

Policy: earliest deadline first over one timeline shared by both kinds of work.

* A stream's frames have due times (``Stream.clock``: ``t0 + k/25``; a non-real-time stream is
  not paced, but its frames get the same nominal clock as priority). A stream's deadline is the due
  time of its next frame to schedule minus the *lead*, the time a stream job of that avatar has
  been taking from scheduling to ready frames (learned, per avatar).
* A batch request (``composite``/``infer``) has no due time; it gets a virtual deadline of
  ``t_recv + scheduling.batch_slack_ms``. Batch requests are first-in first-out among themselves.
* When a ring slot is free, the earliest deadline wins. A stream whose frames are due in less
  than the slack is served before a batch request that just arrived; a batch request that has
  waited for the slack is served before any stream frame due later than that.

Decisions are made as late as they can be without idling a GPU: a worker is given at most
``scheduling.worker_queue`` jobs it has not finished inferring (by default 2: the one it runs and
the next), however many ring slots are free (the others hold batches being composited). So a
stream that starts, or a frame that becomes urgent, competes for the next Run, not for one behind
a queue committed earlier.

Starvation-free both ways: a batch request waits at most until every stream frame whose deadline
is earlier than its own has been scheduled, and each stream job moves its stream's deadline on by
the frames it took; a stream frame waits at most for the batch requests received before its
deadline minus the slack. Streams are also bounded on their own: at most
``streams.max_inflight_batches`` jobs in flight each, and at most ``scheduling.run_ahead_s`` of
frames rendered but not yet sent (so a stream fed faster than real time does not render, and hold,
its whole utterance at once, nor take every slot).

A stream job takes, for every eligible stream of the avatar whose stream has the earliest
deadline, up to ``streams.batch_frames`` frames (three times as many when that stream is already
late), so one Run serves several streams of an avatar.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.audio.mel import FPS
from engine.front.streams import Stream, StreamBatch


class QueueFull(Exception):
    """A batch request the queue has no room for (the front answers ``busy``)."""


class BatchWork(Protocol):
    model: str
    t_recv: float
    t_queued: float                  # set by enqueue
    preferred_gpu: int | None
    nbytes: int


@dataclass
class WorkerView:
    """The scheduler's view of one GPU worker, rebuilt by the front for each call."""
    idx: int
    device: int | None
    free: int                        # free ring slots
    inflight: int                    # jobs holding one of its slots
    models: set[str] = field(default_factory=set)
    ready: bool = True
    at_gpu: int = 0                  # jobs given to it that it has not finished inferring

    def room(self, queue: int) -> int:
        """Jobs it can be given now: a free slot, and fewer than ``queue`` not yet inferred."""
        return min(self.free, queue - self.at_gpu) if self.ready else 0


@dataclass
class Decision:
    """Start this on worker ``worker``: a queued batch request, or frames of streams of one avatar."""
    worker: int
    batch: Any = None
    streams: list[StreamBatch] | None = None


@dataclass
class SchedulerConfig:
    max_batch: int = 50              # frames per job
    batch_frames: int = 8            # frames of one stream per job (x3 when it is late)
    max_inflight_batches: int = 2    # jobs of one stream in flight
    run_ahead_s: float = 3.0         # frames rendered but not yet sent, per stream
    batch_slack_s: float = 1.0       # a batch request's virtual deadline after its arrival
    max_pending: int = 256           # batch requests queued
    max_pending_bytes: int = 2 << 30  # their request bytes
    worker_queue: int = 2            # jobs a GPU worker holds before inferring them (running + next)


class Scheduler:
    LEAD_START_S = 0.1               # lead before the first stream job of an avatar finished
    LEAD_ALPHA = 0.2                 # weight of a new observation in the lead's moving average

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.pending: deque[BatchWork] = deque()
        self.pending_bytes = 0
        self.streams: dict[str, Stream] = {}
        self.lead: dict[str, float] = {}
        self.wanted: set[str] = set()      # networks with work waiting that no worker with room holds

    # -- batch queue -------------------------------------------------------------------------------
    def enqueue(self, work: BatchWork, now: float, startable: int = 0) -> None:
        """Queue a batch request. ``startable``: jobs the workers could take at once; only what
        waits beyond them counts against ``max_pending`` (0 = no queue: busy unless it can start)."""
        cfg = self.cfg
        if len(self.pending) >= cfg.max_pending + startable:
            raise QueueFull(f"every ring slot is in use and {len(self.pending)} requests are queued "
                            f"(capacity.max_pending)")
        if self.pending and self.pending_bytes + work.nbytes > cfg.max_pending_bytes:
            raise QueueFull(f"every ring slot is in use and the queued requests hold {self.pending_bytes} bytes "
                            f"(capacity.max_pending_bytes)")
        work.t_queued = now
        self.pending.append(work)
        self.pending_bytes += work.nbytes

    def cancel(self, work: BatchWork) -> bool:
        try:
            self.pending.remove(work)
        except ValueError:
            return False
        self.pending_bytes -= work.nbytes
        return True

    def expire(self, now: float, limit_s: float) -> list[BatchWork]:
        """Requests queued for longer than ``limit_s`` (time spent waiting for their avatar to
        load not counted), removed from the queue, oldest first (the queue is in queueing order)."""
        old = []
        while self.pending and now - self.pending[0].t_queued > limit_s:
            old.append(self.pending.popleft())
            self.pending_bytes -= old[-1].nbytes
        return old

    # -- streams -----------------------------------------------------------------------------------
    def add_stream(self, s: Stream) -> None:
        self.streams[s.id] = s

    def remove_stream(self, s: Stream) -> None:
        self.streams.pop(s.id, None)

    def observe(self, model: str, seconds: float) -> None:
        """A stream job of ``model`` took ``seconds`` from scheduling to ready frames."""
        old = self.lead.get(model)
        self.lead[model] = seconds if old is None else old + self.LEAD_ALPHA * (seconds - old)

    def stream_deadline(self, s: Stream) -> float:
        return s.clock(s.next_frame) - self.lead.get(s.model, self.LEAD_START_S)

    def batch_deadline(self, work: BatchWork) -> float:
        return work.t_recv + self.cfg.batch_slack_s

    def eligible(self, s: Stream) -> bool:
        cfg = self.cfg
        return (not s.closed and s.schedulable() > 0 and s.inflight - s.stale < cfg.max_inflight_batches
                and s.next_frame - s.next_out < cfg.run_ahead_s * FPS)

    # -- the decision ------------------------------------------------------------------------------
    def schedule(self, now: float, workers: list[WorkerView]) -> list[Decision]:
        """Fill free ring slots, earliest deadline first; returns what to start, in order.

        Work runs only on a worker that holds its network (loaded and warmed up, so no load or cold
        shape lands on a live path). Work whose network no worker with room holds is skipped, never
        blocking what is behind it, and its network is named in :attr:`wanted`: the front asks a
        worker without it to load it meanwhile."""
        decisions: list[Decision] = []
        self.wanted: set[str] = set()
        q = self.cfg.worker_queue
        while True:
            open_ = [w for w in workers if w.room(q) > 0]
            if not open_:
                break
            held = set().union(*(w.models for w in open_))
            head = None
            for work in self.pending:
                if work.model in held:
                    head = work
                    break
                self.wanted.add(work.model)
            ranked = []
            for s in self.streams.values():
                if self.eligible(s):
                    if s.model in held:
                        ranked.append(s)
                    else:
                        self.wanted.add(s.model)
            ranked.sort(key=lambda s: (self.stream_deadline(s), s.inflight, s.opened))
            if head is not None and (not ranked or self.batch_deadline(head) <= self.stream_deadline(ranked[0])):
                w = self._pick(open_, head.model, head.preferred_gpu)
                self.pending.remove(head)
                self.pending_bytes -= head.nbytes
                decisions.append(Decision(w.idx, batch=head))
            elif ranked:
                lead = ranked[0]
                w = self._pick(open_, lead.model, lead.preferred_gpu)
                decisions.append(Decision(w.idx, streams=self._group(now, lead, ranked)))
            else:
                break
            w.free -= 1
            w.inflight += 1
            w.at_gpu += 1
        return decisions

    def _group(self, now: float, lead: Stream, ranked: list[Stream]) -> list[StreamBatch]:
        """Frames of every eligible stream of ``lead``'s avatar (most urgent first) for one job."""
        cfg, group, frames = self.cfg, [], 0
        for s in ranked:
            if s.model != lead.model:
                continue
            room = int(cfg.run_ahead_s * FPS) - (s.next_frame - s.next_out)
            late = s.t0 is not None and not s.dry() and s.clock(s.next_frame) < now
            count = min(s.schedulable(), cfg.batch_frames * (3 if late else 1), room, cfg.max_batch - frames)
            if count <= 0:
                break
            group.append(s.take(count, now))
            frames += count
        return group

    @staticmethod
    def _pick(open_: list[WorkerView], model: str, preferred: int | None) -> WorkerView:
        """The worker for a job of ``model``: one with room that holds the network, the avatar's
        preferred GPU first, then the fewest jobs in flight."""
        return min((w for w in open_ if model in w.models),
                   key=lambda w: (preferred is not None and w.device != preferred, w.inflight, w.idx))
