"""Prometheus metrics recorded by the front: requests, timings, batch sizes, frames, streams, avatars,
refused connections and quotas. Served over HTTP by the supervisor (:mod:`engine.supervisor.metrics_server`).

**Why the supervisor serves them.** The front holds every request, so it measures; but the front
is restarted with all the children when it dies, and its counters would start again from zero each
time, with the endpoint gone meanwhile. The supervisor outlives every child. The front therefore
records with ``prometheus_client`` in its multi-process mode: each value lives in a memory-mapped
file under ``<run_dir>/metrics`` (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before it
spawns anything), written by the front's thread as it counts, read by the supervisor at every
scrape. A dead front's files stay and are summed with its successor's, so a counter never goes
down while the supervisor lives (Prometheus's ``rate()`` handles the reset of a supervisor
restart, when the folder starts empty). What the supervisor knows itself (process restarts by role,
shared memory, the front's last health snapshot) and the GPUs (NVML) are read at scrape time.

Naming follows Prometheus's conventions: the ``lse_`` prefix, base units (seconds, bytes),
``_total`` on counters, and label values from small fixed sets (a method, an error code, a role,
an avatar name that exists, a client key name from the allow-list), never request or stream ids.

Every method here runs on the front's thread and costs a few microseconds; recording happens
before the reply is sent, so a client that has its reply and then scrapes sees it counted.
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from engine import protocol as P

TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 50)
LATE_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LATE_FRAME_S = 0.04                       # a stream frame sent more than one frame period after its due time
INVALID = "invalid"                       # the method label of a request whose method could not be read
REFUSAL_REASONS = ("unknown_key", "mechanism_mismatch", "bad_handshake", "handshake_failed")


class FrontMetrics:
    """The front's metrics; every method is a no-op when ``server.metrics`` is off."""

    def __init__(self, enabled: bool, registry: CollectorRegistry | None = None) -> None:
        self.on = enabled
        if not enabled:
            return
        r = registry                      # None in the engine: values go to the multi-process files only
        self.requests = Counter("lse_requests", "Replies sent, by method and result code (ok or the error code)",
                                ["method", "code"], registry=r)
        self.request_time = Histogram("lse_request_duration_seconds", "composite/infer requests answered ok: "
                                      "from receipt to reply", ["method"], buckets=TIME_BUCKETS, registry=r)
        self.queue_time = Histogram("lse_queue_duration_seconds", "composite/infer requests: from receipt "
                                    "(avatar loading included) to a ring slot", ["method"], buckets=TIME_BUCKETS,
                                    registry=r)
        self.inference_time = Histogram("lse_inference_duration_seconds", "The network's run over one batch, by "
                                        "source (composite, infer, stream)", ["source"], buckets=TIME_BUCKETS, registry=r)
        self.composite_time = Histogram("lse_composite_duration_seconds", "Paste and JPEG of one batch on the "
                                        "compositors, by source (composite, stream)", ["source"], buckets=TIME_BUCKETS,
                                        registry=r)
        self.batch_size = Histogram("lse_batch_size", "Frames per GPU batch, by source (composite, infer, stream)", ["source"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.frames = Counter("lse_frames", "JPEG frames sent to clients: in composite replies, or as stream "
                              "frame events", ["source"], registry=r)
        self.lateness = Histogram("lse_stream_frame_lateness_seconds", "Real-time stream frames: how long after "
                                  "its due time each was sent", buckets=LATE_BUCKETS, registry=r)
        self.late_frames = Counter("lse_stream_late_frames", "Real-time stream frames sent more than 40 ms (one "
                                   "frame) after their due time", registry=r)
        self.streams_opened = Counter("lse_streams_opened", "Streams opened", registry=r)
        self.avatar_requests = Counter("lse_avatar_requests", "composite/infer requests answered ok, by avatar",
                                       ["avatar"], registry=r)
        self.avatar_load = Histogram("lse_avatar_load_duration_seconds", "Decoding an avatar into shared memory",
                                     ["avatar"], buckets=LOAD_BUCKETS, registry=r)
        self.refused = Counter("lse_connections_refused", "Client connections refused: unknown_key (not in "
                               "server.curve_clients), mechanism_mismatch (plain text against CURVE, or the "
                               "reverse), bad_handshake (wrong server key), handshake_failed (other)",
                               ["reason"], registry=r)
        self.quota = Counter("lse_quota_exceeded", "Requests refused with quota_exceeded, by client key and quota",
                             ["client", "quota"], registry=r)
        for method in P.METHODS:          # the series exist (at 0) before the first request
            self.requests.labels(method, "ok")
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason)
        for source in ("composite", "stream"):
            self.frames.labels(source)

    # -- requests --------------------------------------------------------------------------------
    def replied(self, req: P.Request | None, header: bytes) -> None:
        """Every reply (``Front._answer``)."""
        if self.on:
            method = req.method if req is not None else INVALID
            self.requests.labels(method, P.reply_code(header)).inc()

    def batch_done(self, job: Any, now: float | None = None) -> None:
        """A composite/infer job answered ok (``Front._reply_job``, before the reply is sent)."""
        if not self.on:
            return
        now = time.monotonic() if now is None else now
        method = job.req.method
        self.request_time.labels(method).observe(now - job.t_recv)
        self.queue_time.labels(method).observe(max(0.0, job.t_start - job.t_recv))
        self._job(method, job, now)
        self.avatar_requests.labels(job.model).inc()
        if method == "composite":
            self.frames.labels("composite").inc(job.batch)

    def stream_job_done(self, job: Any, now: float | None = None) -> None:
        """A batch of stream frames is ready (``_finish_stream_job``)."""
        if self.on:
            self._job("stream", job, time.monotonic() if now is None else now)

    def _job(self, kind: str, job: Any, now: float) -> None:
        self.inference_time.labels(kind).observe(job.infer_ms / 1000)
        self.batch_size.labels(kind).observe(job.batch)
        if kind != "infer" and job.t_comp:
            self.composite_time.labels(kind).observe(max(0.0, now - job.t_comp))

    # -- streams ---------------------------------------------------------------------------------
    def stream_opened(self) -> None:
        if self.on:
            self.streams_opened.inc()

    def stream_frame(self, stream: Any, meta: dict[str, Any]) -> None:
        """One stream frame sent (``_deliver_streams``)."""
        if not self.on:
            return
        self.frames.labels("stream").inc()
        if stream.realtime:
            late = meta.get("late_ms", 0.0) / 1000
            self.lateness.observe(late)
            if late > LATE_FRAME_S:
                self.late_frames.inc()

    # -- avatars, security -----------------------------------------------------------------------
    def avatar_loaded(self, entry: Any) -> None:
        """An avatar finished loading (``AvatarStore.finish``)."""
        if self.on and entry.state == "loaded":
            self.avatar_load.labels(entry.name).observe(entry.load_ms / 1000)

    def connection_refused(self, reason: str) -> None:
        if self.on:
            self.refused.labels(reason).inc()

    def quota_exceeded(self, client: str, quota: str) -> None:
        if self.on:
            self.quota.labels(client, quota).inc()
