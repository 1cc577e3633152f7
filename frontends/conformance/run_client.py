"""Conformance runner for the Python client (``engine.client.Client``): each transcript step that a
well-behaved client can send (not marked ``raw``) goes through ``Client.submit``/``receive``, and the
reply the client hands back is checked as the raw runner checks frames (ids are the client's own).

    python frontends/conformance/run_client.py tcp://127.0.0.1:5555 docs/conformance/*.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from run_pyzmq import check_events, check_reply, substitute  # noqa: E402

from engine.client import Client  # noqa: E402


def _header(reply: Any) -> tuple[dict[str, Any], list[bytes]]:
    """The reply as the raw runner sees it: its header's fields and its binary frames."""
    descs, frames = [], []
    for d, f in reply.buffers:
        if not descs or descs[-1] is not d:
            descs.append(d)
        frames.append(bytes(f.buffer if hasattr(f, "buffer") else f))
    h: dict[str, Any] = {"v": 1, "id": reply.id, "status": reply.status}
    if reply.ok:
        h.update(result=reply.result, buffers=descs)
    else:
        h["error"] = reply.error
    if reply.event:
        h.update(event=reply.event, stream=reply.stream, id=None)
    return h, frames


def step(c: Client, st: dict[str, Any], names: dict[str, Any]) -> list[str]:
    sent = substitute(st["send"], names)
    head = sent[0]["json"]
    arrays = []
    for desc, spec in zip(head.get("buffers", []), sent[1:]):
        f = spec["fill"]
        arrays.append((desc["name"], np.full(f["count"], f["value"], f["dtype"]).reshape(desc["shape"])))
    expect = dict(substitute(st["expect"], names))
    expect.pop("id", None)                            # the client numbers its requests itself
    rid = c.submit(head["method"], head.get("params"), arrays)
    header, frames = _header(c.receive(rid))
    bad = check_reply(header, frames, expect)
    for name, key in st.get("capture", {}).items():
        names[name] = (header.get("result") or {}).get(key)
    if "events" in st and not bad:
        ev = substitute(st["events"], names)
        events = []
        while not events or events[-1][0].get("event") not in ("stream_end", "stream_error"):
            events.append(_header(c.next_event(ev["stream"], timeout=60)))
        bad += check_events(events, ev)
    return bad


def run(endpoint: str, paths: list[Path]) -> tuple[list[str], int]:
    """(failures, steps skipped because only a raw client can send them)."""
    failures, skipped = [], 0
    for path in paths:
        transcript = json.loads(Path(path).read_text())
        if "steps" not in transcript:                # conditions.json: a table, not a conversation
            continue
        names: dict[str, Any] = {}
        with Client(endpoint, timeout=60) as c:
            for i, st in enumerate(transcript["steps"]):
                if st.get("raw"):
                    skipped += 1
                    continue
                failures += [f"{Path(path).name} step {i}: {b}" for b in step(c, st, names)]
    return failures, skipped


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    fails, skipped = run(sys.argv[1], [Path(p) for p in sys.argv[2:]])
    print("\n".join(fails) if fails else f"all {len(sys.argv) - 2} transcripts passed ({skipped} raw steps skipped)")
    sys.exit(1 if fails else 0)
