"""Conformance runner in raw pyzmq (no engine code): sends each transcript's frames exactly as
written and checks the replies (docs/conformance/README.md defines the format).

    python frontends/conformance/run_pyzmq.py tcp://127.0.0.1:5555 docs/conformance/*.json

Exit status 0 when every step passed; one line per failure otherwise. Needs only pyzmq.
"""
from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import zmq

SIZES = {"float32": ("f", 4), "int16": ("h", 2), "uint8": ("B", 1)}


def substitute(obj: Any, names: dict[str, Any]) -> Any:
    """``"$name"`` strings become the values captured earlier in the transcript."""
    if isinstance(obj, str) and obj.startswith("$") and obj[1:] in names:
        return names[obj[1:]]
    if isinstance(obj, dict):
        return {k: substitute(v, names) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, names) for v in obj]
    return obj


def frame_bytes(spec: dict[str, Any]) -> bytes:
    if "json" in spec:
        return json.dumps(spec["json"]).encode()
    if "text" in spec:
        return spec["text"].encode()
    if "hex" in spec:
        return bytes.fromhex(spec["hex"])
    f = spec["fill"]
    code, _ = SIZES[f["dtype"]]
    return struct.pack(f"<{f['count']}{code}", *([f["value"]] * f["count"]))


def check_reply(header: dict[str, Any], frames: list[bytes], expect: dict[str, Any]) -> list[str]:
    bad = []

    def want(cond: bool, what: str) -> None:
        if not cond:
            bad.append(what)
    if "id" in expect:
        want(header.get("id") == expect["id"], f"id {header.get('id')!r}, expected {expect['id']!r}")
    want(header.get("v") == expect.get("v", 1), f"v {header.get('v')!r}")
    want(header.get("status") == expect["status"], f"status {header.get('status')!r}, expected {expect['status']!r}"
         + (f" ({header.get('error')})" if header.get("error") else ""))
    if expect["status"] == "error":
        err = header.get("error") or {}
        want(err.get("code") == expect.get("code"), f"code {err.get('code')!r}, expected {expect.get('code')!r}")
        want(isinstance(err.get("message"), str) and err.get("message") != "", "error without a message")
        want("result" not in header and "buffers" not in header, "an error reply with result or buffers")
        want(len(frames) == 0, f"an error reply with {len(frames)} binary frames")
        return bad
    result = header.get("result")
    want(isinstance(result, dict), "no result object")
    result = result or {}
    for k in expect.get("result_keys", []):
        want(k in result, f"result lacks {k!r}")
    for k, v in expect.get("result", {}).items():
        want(result.get(k) == v, f"result[{k!r}] = {result.get(k)!r}, expected {v!r}")
    descs = header.get("buffers")
    want(isinstance(descs, list), "no buffers list")
    descs = descs or []
    if "buffers" in expect:
        want(len(descs) == len(expect["buffers"]), f"{len(descs)} buffer descriptors, expected {len(expect['buffers'])}")
        for d, e in zip(descs, expect["buffers"]):
            for k, v in e.items():
                want(d.get(k) == v, f"buffer {d.get('name')!r}: {k} = {d.get(k)!r}, expected {v!r}")
    count = sum(d.get("count", 1) for d in descs)
    want(len(frames) == count, f"{len(frames)} binary frames, the descriptors say {count}")
    i = 0
    for d in descs:
        for _ in range(d.get("count", 1)):
            if i >= len(frames):
                break
            if d.get("dtype") == "jpeg":
                want(frames[i][:2] == b"\xff\xd8" and frames[i][-2:] == b"\xff\xd9", f"frame {i} is not a JPEG")
            elif d.get("dtype") in SIZES:
                n = SIZES[d["dtype"]][1]
                for s in d.get("shape", []):
                    n *= s
                want(len(frames[i]) == n, f"frame {i}: {len(frames[i])} bytes, shape says {n}")
            i += 1
    if "frames" in expect:
        want(1 + len(frames) == expect["frames"], f"{1 + len(frames)} frames in the reply, expected {expect['frames']}")
    return bad


def check_events(events: list[tuple[dict[str, Any], list[bytes]]], expect: dict[str, Any]) -> list[str]:
    bad = []
    names = [h.get("event") for h, _ in events]
    for name, n in expect.get("count", {}).items():
        if names.count(name) != n:
            bad.append(f"{names.count(name)} {name!r} events, expected {n}")
    if expect.get("last") and (not names or names[-1] != expect["last"]):
        bad.append(f"last event {names[-1] if names else None!r}, expected {expect['last']!r}")
    frames = [(h, f) for h, f in events if h.get("event") == "frame"]
    if expect.get("numbers") == "frame":
        got = [h.get("result", {}).get("frame") for h, _ in frames]
        if got != list(range(len(got))):
            bad.append(f"frame numbers {got[:5]}... not 0, 1, 2, ...")
    for h, f in frames:
        if h.get("id") is not None or h.get("stream") != expect["stream"]:
            bad.append(f"event with id {h.get('id')!r}, stream {h.get('stream')!r}")
            break
        if len(f) != 1 or f[0][:2] != b"\xff\xd8":
            bad.append("a frame event without exactly one JPEG")
            break
    return bad


class Runner:
    def __init__(self, endpoint: str, timeout: float = 60.0) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.timeout = timeout
        self.pending: list[tuple[dict[str, Any], list[bytes]]] = []     # events read while waiting for a reply

    def recv(self, deadline: float) -> tuple[dict[str, Any], list[bytes]] | None:
        left = deadline - time.monotonic()
        if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
            return None
        msg = self.sock.recv_multipart()
        return json.loads(msg[0]), msg[1:]

    def step(self, step: dict[str, Any], names: dict[str, Any]) -> list[str]:
        frames = [frame_bytes(substitute(f, names)) for f in step["send"]]
        self.sock.send_multipart(frames)
        expect = substitute(step["expect"], names)
        deadline = time.monotonic() + self.timeout
        while True:
            got = self.recv(deadline)
            if got is None:
                return [f"no reply within {self.timeout} s"]
            header, rest = got
            if "event" in header:
                self.pending.append(got)
                continue
            break
        bad = check_reply(header, rest, expect)
        for name, key in step.get("capture", {}).items():
            names[name] = (header.get("result") or {}).get(key)
        if "events" in step and not bad:
            ev = substitute(step["events"], names)
            events = [e for e in self.pending if e[0].get("stream") == ev["stream"]]
            while not events or events[-1][0].get("event") not in ("stream_end", "stream_error"):
                got = self.recv(deadline)
                if got is None:
                    bad.append(f"events did not end within {self.timeout} s ({len(events)} so far)")
                    break
                if got[0].get("stream") == ev["stream"]:
                    events.append(got)
            bad += check_events(events, ev)
        return bad

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def run(endpoint: str, paths: list[Path]) -> list[str]:
    failures = []
    for path in paths:
        transcript = json.loads(Path(path).read_text())
        if "steps" not in transcript:                # conditions.json: a table, not a conversation
            continue
        runner, names = Runner(endpoint), {}
        try:
            for i, step in enumerate(transcript["steps"]):
                failures += [f"{Path(path).name} step {i}: {b}" for b in runner.step(step, names)]
        finally:
            runner.close()
    return failures


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    fails = run(sys.argv[1], [Path(p) for p in sys.argv[2:]])
    print("\n".join(fails) if fails else f"all {len(sys.argv) - 2} transcripts passed")
    sys.exit(1 if fails else 0)
