"""Reply assembly: a finished batch's reply header and frames, read out of its ring slot.

Plain functions of a :class:`~engine.front.jobs.Job` whose GPU worker and compositors are done;
the :class:`~engine.front.pipeline.Pipeline` sends what they return and frees the slot."""
from __future__ import annotations

import time
from typing import Any

from engine import protocol as P
from engine.front.jobs import Job
from engine.runtime.ring import SlotState


def jpegs(job: Job) -> list[bytes]:
    """The batch's JPEGs, copied out of the ring slot."""
    g = job.gpu
    g.ring.set_state(job.slot, SlotState.SENDING)
    return [job.inline[i] if i in job.inline else bytes(g.ring.jpeg_area(job.slot, i)[:job.sizes[i]])
            for i in range(job.batch)]


def timing(job: Job) -> dict[str, Any]:
    """What every batch reply's result says of the batch and its timings (docs/protocol.md)."""
    g = job.gpu
    return {"model": job.model, "batch_size": job.batch, "start_frame": job.start,
            "frame_indices": job.indices.tolist(),
            "inference_time_ms": round(job.infer_ms, 3), "prep_time_ms": round(job.prep_ms, 3),
            "total_time_ms": round(1000 * (time.monotonic() - job.t_recv), 3),
            "gpu_id": -1 if g.device is None else g.device, "worker": g.idx, "provider": g.provider,
            "success": True}


def infer_reply(job: Job) -> tuple[bytes, list[bytes]]:
    """An ``infer`` reply: the network's output tensor, copied out of the slot."""
    g, shape = job.gpu, (job.batch, *job.entry.graph.output_shape)
    g.ring.set_state(job.slot, SlotState.SENDING)
    out = bytes(memoryview(g.ring.output(job.slot, shape)).cast("B"))
    return P.ok_reply(job.req.id, timing(job), [{"name": "output", "dtype": "float32", "shape": list(shape)}]), [out]


def composite_reply(job: Job) -> tuple[bytes, list[bytes]]:
    """A ``composite`` reply: one JPEG per frame."""
    v = job.entry.view
    frames = jpegs(job)
    result = timing(job)
    result.update(composite_time_ms=round(1000 * (time.monotonic() - job.t_comp), 3),
                  width=v.width, height=v.height, jpeg_bytes=int(sum(job.sizes)))
    return P.ok_reply(job.req.id, result, [{"name": "frames", "dtype": "jpeg", "count": job.batch}]), frames
