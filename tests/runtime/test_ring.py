"""engine/runtime/ring.py (BatchRing) and engine/runtime/shm.py (owned segments): layout, processes, ownership, a stress test."""
from __future__ import annotations

import dataclasses
import itertools
import multiprocessing as mp
import os
import queue
import signal
import struct
import traceback
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engine.runtime import shm
from engine.runtime.ring import CONTROL_BYTES, HEADER, MAGIC, PAGE, BatchRing, RingGeometry, SlotState
from engine.runtime.shm import Segment

SPAWN = mp.get_context("spawn")
FACE = 32
AUDIO_FLOATS = 64
_names = itertools.count()


@pytest.fixture(autouse=True)
def shm_prefix() -> Iterator[str]:
    """A per-test name prefix; whatever segment still carries it after the test is removed and fails it."""
    prefix = f"lsetest{os.getpid()}_{next(_names)}_"
    yield prefix
    left = shm.list_segments(prefix)
    shm.remove_stale(prefix)
    assert not left, f"segments left in /dev/shm: {left}"


def _exists(name: str) -> bool:
    return (Path("/dev/shm") / name).exists()


def _geom(nslots: int = 4, max_batch: int = 8) -> RingGeometry:
    return RingGeometry.for_face(nslots, max_batch, FACE, AUDIO_FLOATS)


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _run_child(target, *args, timeout: float = 30.0):
    """Run ``target(*args, out_q)`` in a spawned process and return what it put on ``out_q``."""
    q = SPAWN.Queue()
    p = SPAWN.Process(target=target, args=(*args, q), daemon=True)
    p.start()
    try:
        result = q.get(timeout=timeout)
        p.join(timeout)
        assert p.exitcode == 0, f"child exit code {p.exitcode}"
        if result[0] == "error":
            pytest.fail(f"child failed:\n{result[1]}")
        return result
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
        q.cancel_join_thread()
        q.close()


# -- geometry and layout -------------------------------------------------------------------------
@pytest.mark.parametrize("geom", [
    RingGeometry.for_face(4, 50, 320),
    RingGeometry.for_face(4, 8, FACE, AUDIO_FLOATS),
    RingGeometry(3, 5, 1000, 10, 7),
    RingGeometry(100, 1, 1, 1, 1),           # the control block alone is larger than a page
    RingGeometry(1, 1, PAGE, PAGE, PAGE),
], ids=["default", "small", "odd", "many-slots", "page-sized"])
def test_geometry_is_page_aligned(geom: RingGeometry) -> None:
    assert geom.data_offset % PAGE == 0
    assert geom.data_offset >= 64 + CONTROL_BYTES * geom.nslots
    assert geom.data_offset - (64 + CONTROL_BYTES * geom.nslots) < PAGE
    for region, per_frame in [(geom.visual_region, geom.visual_bytes), (geom.audio_region, geom.audio_bytes),
                              (geom.output_region, geom.output_bytes)]:
        assert region % PAGE == 0
        assert geom.max_batch * per_frame <= region < geom.max_batch * per_frame + PAGE
    assert geom.slot_bytes == geom.visual_region + geom.audio_region + geom.output_region
    assert geom.total_bytes == geom.data_offset + geom.nslots * geom.slot_bytes


def test_for_face() -> None:
    g = RingGeometry.for_face(2, 10, 160)
    assert g == RingGeometry(2, 10, 6 * 160 * 160 * 4, 32 * 16 * 16 * 4 * 4, 3 * 160 * 160 * 4)
    assert RingGeometry.for_face(2, 10, 160, 100).audio_bytes == 400


def test_header_and_initial_state(shm_prefix: str) -> None:
    g = _geom()
    ring = BatchRing.create(shm_prefix + "r", g)
    try:
        assert ring.name == shm_prefix + "r"
        assert ring.segment.size >= g.total_bytes
        assert HEADER.size <= 64
        assert HEADER.unpack_from(ring.segment.buf, 0) == (MAGIC, g.nslots, g.max_batch, g.visual_bytes,
                                                           g.audio_bytes, g.output_bytes)
        for s in range(g.nslots):
            assert ring.state(s) is SlotState.FREE
            assert ring.seq(s) == 0
    finally:
        ring.close()


def test_views_have_the_right_shape_and_place(shm_prefix: str) -> None:
    g = _geom()
    ring = BatchRing.create(shm_prefix + "r", g)
    try:
        base = _addr(np.frombuffer(ring.segment.buf, np.uint8))
        assert base % PAGE == 0
        for s in range(g.nslots):
            b = g.max_batch - s
            v = ring.visual(s, (b, 6, FACE, FACE))
            a = ring.audio(s, (b, AUDIO_FLOATS))
            o = ring.output(s, (b, 3, FACE, FACE))
            for arr, shape in [(v, (b, 6, FACE, FACE)), (a, (b, AUDIO_FLOATS)), (o, (b, 3, FACE, FACE))]:
                assert arr.shape == shape and arr.dtype == np.float32
                assert arr.flags.c_contiguous and arr.flags.writeable
                assert _addr(arr) % PAGE == 0
            slot0 = base + g.data_offset + s * g.slot_bytes
            assert _addr(v) == slot0
            assert _addr(a) == slot0 + g.visual_region
            assert _addr(o) == slot0 + g.visual_region + g.audio_region
            for i in range(g.max_batch):
                with ring.jpeg_area(s, i) as m:
                    assert len(m) == g.visual_bytes
                    assert _addr(np.frombuffer(m, np.uint8)) == slot0 + i * g.visual_bytes
            del v, a, o
    finally:
        ring.close()


def test_slots_and_regions_do_not_overlap(shm_prefix: str) -> None:
    g = RingGeometry(3, 5, 1000, 12, 4000)          # sizes that leave padding at the end of each region
    ring = BatchRing.create(shm_prefix + "r", g)
    try:
        def regions(s: int):
            return [ring.visual(s, (g.visual_region // 4,)), ring.audio(s, (g.audio_region // 4,)),
                    ring.output(s, (g.output_region // 4,))]

        # fill every whole region (padding included) of every slot with its own pattern
        for s in range(g.nslots):
            for r, arr in enumerate(regions(s)):
                arr[:] = np.arange(arr.size, dtype=np.float32) + (s * 3 + r) * 1e6
                del arr
        for s in range(g.nslots):
            ring.set_state(s, SlotState.INFERRED, seq=1000 + s, batch=s + 1)
        for s in range(g.nslots):
            for r, arr in enumerate(regions(s)):
                np.testing.assert_array_equal(arr, np.arange(arr.size, dtype=np.float32) + (s * 3 + r) * 1e6,
                                              err_msg=f"slot {s} region {r}")
                del arr
            assert ring.state(s) is SlotState.INFERRED and ring.seq(s) == 1000 + s
        assert HEADER.unpack_from(ring.segment.buf, 0)[0] == MAGIC
        # the JPEG area of frame i of a slot lies inside that slot's visual region
        for s in range(g.nslots):
            with ring.jpeg_area(s, g.max_batch - 1) as m:
                m[:] = b"\xab" * len(m)
            v = ring.visual(s, (g.visual_region // 4,))
            assert v.view(np.uint8)[(g.max_batch - 1) * g.visual_bytes:g.max_batch * g.visual_bytes].tolist() \
                == [0xAB] * g.visual_bytes
            del v
            a = ring.audio(s, (g.audio_region // 4,))
            np.testing.assert_array_equal(a, np.arange(a.size, dtype=np.float32) + (s * 3 + 1) * 1e6)
            del a
    finally:
        ring.close()


def test_view_larger_than_region(shm_prefix: str) -> None:
    g = _geom()
    ring = BatchRing.create(shm_prefix + "r", g)
    try:
        ring.visual(0, (g.visual_region // 4,))              # exactly the region: fine
        ring.output(g.nslots - 1, (g.output_region // 4,))
        with pytest.raises(ValueError, match="bytes"):
            ring.visual(0, (g.visual_region // 4 + 1,))
        with pytest.raises(ValueError, match="bytes"):
            ring.audio(1, (g.audio_region // 4 + 1,))
        with pytest.raises(ValueError, match="bytes"):
            ring.output(g.nslots - 1, (g.max_batch + 1, 3, FACE, FACE + 64))
    finally:
        ring.close()


@pytest.mark.parametrize("slot", [-1, 4, 5, 100])
def test_bad_slot_index(shm_prefix: str, slot: int) -> None:
    ring = BatchRing.create(shm_prefix + "r", _geom(nslots=4))
    try:
        with pytest.raises(IndexError, match="slot"):
            ring.visual(slot, (1,))
        with pytest.raises(IndexError, match="slot"):
            ring.audio(slot, (1,))
        with pytest.raises(IndexError, match="slot"):
            ring.output(slot, (1,))
        with pytest.raises(IndexError, match="slot"):
            ring.jpeg_area(slot, 0)
    finally:
        ring.close()


def test_control_words(shm_prefix: str) -> None:
    ring = BatchRing.create(shm_prefix + "r", _geom())
    try:
        ring.set_state(1, SlotState.FILLED, seq=42, batch=7)
        assert ring.state(1) is SlotState.FILLED and ring.seq(1) == 42
        assert ring.check(1, 42, SlotState.FILLED)
        assert not ring.check(1, 41, SlotState.FILLED)
        assert not ring.check(1, 42, SlotState.QUEUED)
        ring.set_state(1, SlotState.QUEUED)                  # seq and batch kept
        assert ring.check(1, 42, SlotState.QUEUED)
        assert int(ring._control[1, 2]) == 7
        for s in (0, 2, 3):                                  # the others untouched
            assert ring.state(s) is SlotState.FREE and ring.seq(s) == 0
        big = (1 << 32) + 5                                  # sequence numbers are 32-bit, compared masked
        ring.set_state(2, SlotState.RUNNING, seq=big)
        assert ring.seq(2) == 5
        assert ring.check(2, big, SlotState.RUNNING) and ring.check(2, 5, SlotState.RUNNING)
        assert not ring.check(2, big + 1, SlotState.RUNNING)
        for st in SlotState:
            ring.set_state(3, st)
            assert ring.state(3) is st
    finally:
        ring.close()


# -- processes, ownership ------------------------------------------------------------------------
def _child_attach(name: str, out_q) -> None:
    try:
        ring = BatchRing.attach(name)
        g = ring.geometry
        crc = zlib.crc32(ring.segment.buf[g.data_offset:g.total_bytes])
        states = [(int(ring.state(s)), ring.seq(s)) for s in range(g.nslots)]
        o = ring.output(2, (g.max_batch, 3, FACE, FACE))
        o[:] = 7.5
        del o
        ring.set_state(2, SlotState.INFERRED, seq=99, batch=3)
        owner = ring.segment.owner
        ring.close()
        out_q.put(("ok", dataclasses.astuple(g), crc, states, owner))
    except BaseException:
        out_q.put(("error", traceback.format_exc()))


def test_attach_in_another_process(shm_prefix: str) -> None:
    g = _geom()
    name = shm_prefix + "r"
    ring = BatchRing.create(name, g)
    try:
        rng = np.random.default_rng(0)
        for s in range(g.nslots):
            v = ring.visual(s, (g.max_batch, 6, FACE, FACE))
            v[:] = rng.standard_normal(v.shape, dtype=np.float32)
            del v
        ring.set_state(1, SlotState.QUEUED, seq=17, batch=4)
        crc = zlib.crc32(ring.segment.buf[g.data_offset:g.total_bytes])

        _, geom, child_crc, states, owner = _run_child(_child_attach, name)
        assert RingGeometry(*geom) == g
        assert child_crc == crc
        assert states[1] == (int(SlotState.QUEUED), 17)
        assert states[0] == (int(SlotState.FREE), 0)
        assert owner is False
        # what the child wrote is here, and its exit did not unlink the segment (no resource tracker)
        assert _exists(name)
        assert ring.check(2, 99, SlotState.INFERRED)
        assert int(ring._control[2, 2]) == 3
        o = ring.output(2, (g.max_batch, 3, FACE, FACE))
        assert (o == 7.5).all()
        del o
        # a second attach in this process sees the same memory too
        other = BatchRing.attach(name)
        assert other.geometry == g and other.check(2, 99, SlotState.INFERRED)
        other.close()
    finally:
        ring.close()
    assert not _exists(name)


def test_attach_non_ring_segment(shm_prefix: str) -> None:
    name = shm_prefix + "notring"
    seg = Segment(name, 4096, create=True)
    try:
        seg.buf[:8] = b"NOTARING"
        with pytest.raises(ValueError, match="not a batch ring"):
            BatchRing.attach(name)
        assert _exists(name)                                 # a failed attach leaves it alone
    finally:
        seg.close()


def test_attach_tiny_non_ring_segment(shm_prefix: str) -> None:
    name = shm_prefix + "tiny"
    seg = Segment(name, 8, create=True)
    try:
        BatchRing.attach(name)
    except ValueError:
        pass
    except struct.error as e:
        pytest.fail("ENGINE BUG engine/runtime/ring.py BatchRing.attach: a segment smaller than the 40-byte header "
                    f"raises struct.error ({e}) instead of ValueError, and its Segment is not closed")
    else:
        pytest.fail("attaching an 8-byte segment as a ring succeeded")
    finally:
        seg.close()


def test_attach_missing_segment(shm_prefix: str) -> None:
    with pytest.raises(FileNotFoundError):
        BatchRing.attach(shm_prefix + "missing")


def _child_attach_segment(name: str, out_q) -> None:
    try:
        seg = Segment(name)
        data = bytes(seg.buf[:4])
        seg.buf[4:8] = b"kid!"
        owner = seg.owner
        seg.close()
        out_q.put(("ok", data, owner))
    except BaseException:
        out_q.put(("error", traceback.format_exc()))


def test_only_the_creator_unlinks(shm_prefix: str) -> None:
    name = shm_prefix + "seg"
    creator = Segment(name, 100, create=True)
    assert creator.owner and creator.size >= 100
    creator.buf[:4] = b"abcd"
    try:
        attacher = Segment(name)
        assert not attacher.owner
        assert bytes(attacher.buf[:4]) == b"abcd"
        attacher.close()
        assert _exists(name)
        # in another process: attach, write, close, exit; the segment stays
        _, data, owner = _run_child(_child_attach_segment, name)
        assert data == b"abcd" and owner is False
        assert _exists(name)
        assert bytes(creator.buf[4:8]) == b"kid!"
    finally:
        creator.close()
    assert not _exists(name)
    assert not creator.owner
    creator.close()                                          # a second close is harmless


def test_ring_close_ownership(shm_prefix: str) -> None:
    name = shm_prefix + "r"
    ring = BatchRing.create(name, _geom())
    try:
        other = BatchRing.attach(name)
        other.close()
        assert _exists(name)
    finally:
        ring.close()
    assert not _exists(name)


def _child_close_with_live_view(name: str, out_q) -> None:
    try:
        ring = BatchRing.create(name, _geom())
        view = ring.visual(0, (4,))
        view[:] = 3.0
        ring.close()                                         # the owner closes while a view is alive
        unlinked = not _exists(name)
        intact = bool((view == 3.0).all())                  # Segment.close: "the mapping goes with the process"
        out_q.put(("done", unlinked, intact))
    except BaseException:
        out_q.put(("error", traceback.format_exc()))


def test_owner_close_with_a_live_view(shm_prefix: str) -> None:
    """In a child process: a view that outlives the mapping reads unmapped memory (a segfault)."""
    name = shm_prefix + "r"
    q = SPAWN.Queue()
    p = SPAWN.Process(target=_child_close_with_live_view, args=(name, q), daemon=True)
    p.start()
    try:
        p.join(30)                                           # the message is tiny: the child exits without waiting
        try:
            msg = q.get(timeout=5 if p.exitcode == 0 else 0.2)
        except queue.Empty:
            msg = None
        if msg is not None:
            assert msg[0] != "error", msg[1]
            assert msg[1], "the owner's close() must unlink even while a view is alive"
        if msg != ("done", True, True) or p.exitcode != 0:
            seen = "a segfault" if p.exitcode == -signal.SIGSEGV else f"{msg!r}, exit code {p.exitcode}"
            pytest.fail("ENGINE BUG engine/runtime/shm.py Segment.close (with engine/runtime/ring.py BatchRing._view): the "
                        "`except BufferError` guard never fires for the ring's views, because "
                        "np.ndarray(shape, dtype, buffer=segment.buf, offset=...) keeps no buffer export on the "
                        "memoryview; SharedMemory.close() therefore unmaps the memory while a view is still alive "
                        "(ring.visual/audio/output, ring._control; likewise avatar.py's frames/crops/rects and "
                        "process.py's heartbeat times), so its next access reads unmapped or reused memory "
                        f"(here: {seen}) instead of the mapping living on as the comment says.")
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
        q.cancel_join_thread()
        q.close()
        shm.unlink(name)


def test_remove_stale_only_touches_its_prefix(shm_prefix: str) -> None:
    a = [Segment(shm_prefix + f"a{i}", 64, create=True) for i in range(3)]
    b = Segment(shm_prefix + "b0", 64, create=True)
    try:
        assert shm.list_segments(shm_prefix + "a") == sorted(s.name for s in a)
        removed = shm.remove_stale(shm_prefix + "a")
        assert removed == sorted(s.name for s in a)
        assert shm.list_segments(shm_prefix) == [b.name]
        assert shm.remove_stale(shm_prefix + "a") == []
        assert not shm.unlink(a[0].name)
        # the mapping of a removed segment still works; its owner's close does not fail
        a[0].buf[:2] = b"ok"
        assert bytes(a[0].buf[:2]) == b"ok"
    finally:
        for s in [*a, b]:
            s.close()
    assert shm.list_segments(shm_prefix) == []


def test_list_segments_without_dev_shm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path / "nope")
    assert shm.list_segments("lse") == []
    assert shm.remove_stale("lse") == []


# -- stress: the slot state machine across three processes -----------------------------------------
def _network(visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
    return visual[:, :3] * np.float32(2) + audio.mean(axis=1, dtype=np.float32)[:, None, None, None]


def _stress_gpu(name: str, jobs, replies) -> None:
    ring = None
    try:
        ring = BatchRing.attach(name)
        while (msg := jobs.get()) is not None:
            slot, seq, b = msg
            if not ring.check(slot, seq, SlotState.QUEUED):
                replies.put(("stale", "gpu", slot, seq))
                continue
            if int(ring._control[slot, 2]) != b:
                raise AssertionError(f"slot {slot} seq {seq}: batch word {int(ring._control[slot, 2])} != {b}")
            ring.set_state(slot, SlotState.RUNNING)
            v = ring.visual(slot, (b, 6, FACE, FACE))
            a = ring.audio(slot, (b, AUDIO_FLOATS))
            o = ring.output(slot, (b, 3, FACE, FACE))
            o[:] = _network(v, a)
            del v, a, o
            ring.set_state(slot, SlotState.INFERRED)
            replies.put(("inferred", slot, seq))
    except BaseException:
        replies.put(("crash", "gpu", traceback.format_exc()))
    finally:
        if ring is not None:
            ring.close()


def _stress_compositor(name: str, jobs, replies) -> None:
    ring = None
    try:
        ring = BatchRing.attach(name)
        while (msg := jobs.get()) is not None:
            slot, seq, b = msg
            if not ring.check(slot, seq, SlotState.COMPOSITING):
                replies.put(("stale", "comp", slot, seq))
                continue
            v = ring.visual(slot, (b, 6, FACE, FACE))
            a = ring.audio(slot, (b, AUDIO_FLOATS))
            o = ring.output(slot, (b, 3, FACE, FACE))
            consistent = bool(np.array_equal(o, _network(v, a)))
            crcs = [zlib.crc32(o[i].tobytes()) for i in range(b)]
            del v, a, o
            for i in range(b):                # the visual input is consumed: write the "JPEGs" over it
                with ring.jpeg_area(slot, i) as m:
                    struct.pack_into("<4sIII", m, 0, b"JPEG", seq & 0xFFFFFFFF, i, crcs[i])
            replies.put(("composited", slot, seq, consistent))
    except BaseException:
        replies.put(("crash", "comp", traceback.format_exc()))
    finally:
        if ring is not None:
            ring.close()


def test_stress_slot_state_machine(shm_prefix: str) -> None:
    seed = int(os.environ.get("LSE_STRESS_SEED", "20240611"))
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    nbatches, nslots, max_batch = 600, 4, 8
    g = _geom(nslots, max_batch)
    name = shm_prefix + "stress"
    ring = BatchRing.create(name, g)
    gpu_q, comp_q, replies = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_stress_gpu, args=(name, gpu_q, replies), daemon=True),
             SPAWN.Process(target=_stress_compositor, args=(name, comp_q, replies), daemon=True)]
    try:
        for p in procs:
            p.start()
        seqs = itertools.count((1 << 32) - 150)          # the 32-bit sequence wraps during the run
        free = list(range(nslots))
        inflight: dict[int, tuple[int, int, np.ndarray]] = {}   # slot -> (seq, batch, expected output)
        history: list[tuple[int, int, int]] = []                # freed (slot, seq, batch)
        stale_sent = {"gpu": 0, "comp": 0}
        stale_seen = {"gpu": 0, "comp": 0}
        submitted = verified = 0
        sizes = []

        def replay(kind: str, msg: tuple[int, int, int]) -> None:
            (gpu_q if kind == "gpu" else comp_q).put(msg)
            stale_sent[kind] += 1

        def get() -> tuple:
            try:
                msg = replies.get(timeout=20)
            except queue.Empty:
                pytest.fail(f"no reply in 20 s (seed={seed}); exit codes {[p.exitcode for p in procs]}, "
                            f"in flight {sorted(inflight)}, states {[ring.state(s).name for s in range(nslots)]}")
            if msg[0] == "crash":
                pytest.fail(f"{msg[1]} process failed (seed={seed}):\n{msg[2]}")
            return msg

        while verified < nbatches:
            # the front: fill every free slot with a new batch
            while free and submitted < nbatches:
                slot = free.pop(int(rng.integers(len(free))))
                assert ring.state(slot) is SlotState.FREE, f"slot {slot} allocated while {ring.state(slot).name}"
                b = int(rng.integers(1, max_batch + 1))
                seq = next(seqs)
                vis = rng.standard_normal((b, 6, FACE, FACE), dtype=np.float32)
                aud = rng.standard_normal((b, AUDIO_FLOATS), dtype=np.float32)
                ring.visual(slot, vis.shape)[:] = vis
                ring.audio(slot, aud.shape)[:] = aud
                ring.set_state(slot, SlotState.FILLED, seq, b)
                inflight[slot] = (seq, b, _network(vis, aud))
                ring.set_state(slot, SlotState.QUEUED)
                gpu_q.put((slot, seq, b))
                submitted += 1
                sizes.append(b)
                if history and rng.random() < 0.2:       # an old use of some slot, to both consumers
                    old = history[int(rng.integers(len(history)))]
                    replay("gpu", old)
                    if rng.random() < 0.5:
                        replay("comp", old)

            msg = get()
            kind = msg[0]
            if kind == "stale":
                stale_seen[msg[1]] += 1
                continue
            slot, seq = msg[1], msg[2]
            assert slot in inflight and inflight[slot][0] == seq, f"reply for unknown use {slot}/{seq}"
            want_seq, b, expected = inflight[slot]
            if kind == "inferred":
                assert ring.check(slot, seq, SlotState.INFERRED), \
                    f"slot {slot}: {ring.state(slot).name}/{ring.seq(slot)} after inferred {seq}"
                ring.set_state(slot, SlotState.COMPOSITING)
                comp_q.put((slot, seq, b))
                if rng.random() < 0.2:                   # the right use, but no longer QUEUED
                    replay("gpu", (slot, seq, b))
            elif kind == "composited":
                assert msg[3], f"slot {slot} seq {seq}: output does not match the inputs in the ring"
                assert ring.check(slot, seq, SlotState.COMPOSITING)
                ring.set_state(slot, SlotState.SENDING)
                if rng.random() < 0.2:                   # the right use, but no longer COMPOSITING
                    replay("comp", (slot, seq, b))
                for i in range(b):
                    with ring.jpeg_area(slot, i) as m:
                        magic, s, frame, crc = struct.unpack_from("<4sIII", m, 0)
                    assert (magic, s, frame) == (b"JPEG", seq & 0xFFFFFFFF, i), f"slot {slot} frame {i}"
                    assert crc == zlib.crc32(expected[i].tobytes()), \
                        f"slot {slot} seq {seq} frame {i}: output differs from f(inputs the front wrote)"
                ring.set_state(slot, SlotState.FREE)
                del inflight[slot]
                free.append(slot)
                history.append((slot, seq, b))
                verified += 1
            else:
                pytest.fail(f"unexpected reply {msg!r}")

        # every replayed message must have been rejected, and nothing else may arrive
        while stale_seen != stale_sent:
            msg = get()
            assert msg[0] == "stale", f"unexpected reply after the run: {msg!r}"
            stale_seen[msg[1]] += 1
        gpu_q.put(None)
        comp_q.put(None)
        for p in procs:
            p.join(15)
            assert p.exitcode == 0, f"{p.name} exit code {p.exitcode}"
        with pytest.raises(queue.Empty):
            replies.get(timeout=0.05)

        assert verified == submitted == nbatches
        assert stale_seen == stale_sent and stale_sent["gpu"] > 20 and stale_sent["comp"] > 20
        assert len(set(sizes)) == max_batch                     # every batch size was exercised
        assert all(ring.state(s) is SlotState.FREE for s in range(nslots))
    finally:
        for q in (gpu_q, comp_q):
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in procs:
            if p.pid is not None:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        for q in (gpu_q, comp_q, replies):
            q.cancel_join_thread()
            q.close()
        ring.close()
    assert not _exists(name)
