"""The compositor's chunk work (engine/compositor/compositor.py: ChunkCompositor), in-process on a real ring:
both avatar layouts, idle frames given per chunk or per frame, JPEGs too big for their area."""
from __future__ import annotations

import os

import numpy as np
import pytest
import simplejpeg

from engine.avatars.disk import avatar_files
from engine.avatars.frames import AvatarView
from engine.avatars.spliced import SplicedAvatarView
from engine.compositor.compositor import ChunkCompositor
from engine.kernels.image import FrameCompositor
from engine.kernels.splice import FrameCodec, Settings
from engine.runtime.ring import BatchRing, RingGeometry
from engine.runtime.shm import list_segments
from tests.avatars.test_avatar import copy_avatar

PREFIX = f"tcmp{os.getpid()}"      # per process: the xdist workers run this module side by side
FACE = [3, 320, 320]


@pytest.fixture(autouse=True)
def no_leaks():
    yield
    assert list_segments(f"{PREFIX}_") == []


@pytest.fixture
def setup(tmp_path, models_root):
    copy_avatar(models_root, tmp_path, "a", n=4)
    files = avatar_files(tmp_path, "a")
    spliced = SplicedAvatarView.create(f"{PREFIX}_s", files, 320, Settings())
    decoded = AvatarView.create(f"{PREFIX}_d", files, 320)
    ring = BatchRing.create(f"{PREFIX}_ring", RingGeometry.for_face(1, 8, 320))
    out = ring.output(0, (8, *FACE))
    out[:] = np.random.default_rng(0).random(out.shape, np.float32)
    yield spliced, decoded, ring
    ring.close()
    spliced.close()
    decoded.close()


def jpegs(ring, start, sizes, inline, blobs):
    got = []
    for j, n in enumerate(sizes):
        i = start + j
        got.append(blobs[inline.index(i)] if i in inline else bytes(ring.jpeg_area(0, i)[:n]))
    return got


@pytest.mark.parametrize("mode", ["synctalk", "stretch"])
def test_spliced_and_decoded_avatars_give_the_same_pixels(setup, mode):
    spliced, decoded, ring = setup
    chunks = ChunkCompositor()
    indices = [3, 0, 2]
    a = jpegs(ring, 2, *chunks(spliced, ring, 0, 2, indices, FACE, mode, 75, "420"))
    b = jpegs(ring, 2, *chunks(decoded, ring, 0, 2, indices, FACE, mode, 75, "420"))
    out = ring.output(0, (8, *FACE))
    codec = FrameCodec(720, 1280, Settings())
    for j, k in enumerate(indices):
        composited = FrameCompositor().composite(decoded.frames[k], out[2 + j], tuple(decoded.rects[k]),
                                                 decoded.crops[k], mode)
        assert a[j] == codec.encode_full(composited)              # splice: the restart-coded full encode
        assert b[j] == simplejpeg.encode_jpeg(composited, 75, "BGR", "420", True)   # full: today's bytes
        assert np.array_equal(simplejpeg.decode_jpeg(a[j]), simplejpeg.decode_jpeg(b[j]))


def test_idle_per_frame_or_per_chunk(setup):
    spliced, decoded, ring = setup
    chunks = ChunkCompositor()
    codec = FrameCodec(720, 1280, Settings())
    idle = [True, False, True, False]
    got = jpegs(ring, 0, *chunks(spliced, ring, 0, 0, [0, 1, 2, 3], FACE, "synctalk", 75, "420", idle))
    for k, (jpeg, silent) in enumerate(zip(got, idle)):
        background = codec.encode_full(decoded.frames[k])
        assert (jpeg == background) == silent                   # idle: the background's own JPEG
    all_idle = jpegs(ring, 0, *chunks(spliced, ring, 0, 0, [2, 1], FACE, "synctalk", 75, "420", True))
    assert all_idle == [codec.encode_full(decoded.frames[2]), codec.encode_full(decoded.frames[1])]
    full_idle = jpegs(ring, 0, *chunks(decoded, ring, 0, 0, [1], FACE, "synctalk", 75, "420", [True]))
    assert full_idle == [simplejpeg.encode_jpeg(decoded.frames[1], 75, "BGR", "420", True)]
    with pytest.raises(ValueError, match="idle flags"):
        chunks(spliced, ring, 0, 0, [0, 1], FACE, "synctalk", 75, "420", [True])


def test_jpeg_bigger_than_its_area_travels_inline(tmp_path, models_root):
    """A ring sized for a tiny network has areas smaller than a 720p JPEG: it comes back inline."""
    copy_avatar(models_root, tmp_path, "a", n=2)
    files = avatar_files(tmp_path, "a")
    spliced = SplicedAvatarView.create(f"{PREFIX}_s", files, 320, Settings())
    ring = BatchRing.create(f"{PREFIX}_small", RingGeometry.for_face(1, 4, 32))
    big = BatchRing.create(f"{PREFIX}_big", RingGeometry.for_face(1, 4, 320))
    try:
        assert len(ring.jpeg_area(0, 0)) < 30_000
        face = np.random.default_rng(1).random((2, *FACE), np.float32)
        big.output(0, (2, *FACE))[:] = face
        chunks = ChunkCompositor()
        ref = jpegs(big, 0, *chunks(spliced, big, 0, 0, [0, 1], FACE, "synctalk", 75, "420", [False, True]))
        # the small ring's output area holds only 32x32 faces: hand it the same faces through a view
        ring.output = lambda slot, shape: face                  # type: ignore[method-assign]
        sizes, inline, blobs = chunks(spliced, ring, 0, 0, [0, 1], FACE, "synctalk", 75, "420", [False, True])
        assert inline == [0, 1] and blobs == ref and sizes == [len(b) for b in ref]
    finally:
        ring.close()
        big.close()
        spliced.close()


SERVES_WARM = """
import sys
from pathlib import Path
import numpy as np
from engine.avatars.disk import avatar_files
from engine.avatars.frames import AvatarView
from engine.avatars.spliced import SplicedAvatarView
from engine.compositor.compositor import ChunkCompositor, warm_up_kernels
from engine.kernels import image, jpeg_bits
from engine.kernels.splice import Settings
from engine.runtime.ring import BatchRing, RingGeometry

warm_up_kernels()                                   # what the fork server runs before any request
kernels = [f for m in (jpeg_bits, image) for f in vars(m).values() if hasattr(f, "signatures")]
before = {f.__name__: len(f.signatures) for f in kernels}
files, prefix, face = avatar_files(Path(sys.argv[1]), "a"), sys.argv[2], [3, 320, 320]
views = [SplicedAvatarView.create(prefix + "_s", files, 320, Settings()), AvatarView.create(prefix + "_d", files, 320)]
ring = BatchRing.create(prefix + "_ring", RingGeometry.for_face(1, 8, 320))
try:
    ring.output(0, (8, *face))[:] = np.random.default_rng(0).random((8, *face), np.float32)
    for view in views:
        for mode in ("synctalk", "stretch"):
            for idle in (False, [True, False, False]):
                ChunkCompositor()(view, ring, 0, 2, [3, 0, 2], face, mode, 75, "420", idle)
finally:
    ring.close()
    for view in views:
        view.close()
after = {f.__name__: len(f.signatures) for f in kernels}
print({k: (before[k], after[k]) for k in after if after[k] != before[k]})
"""


def test_after_the_warm_up_a_spliced_or_decoded_avatar_compiles_no_kernel(tmp_path, models_root):
    """warm_up_kernels covers the argument types serving passes (numba compiles a version per type:
    a read-only array is another type): building a spliced avatar and a compositor's frames, idle or
    not, then compile nothing, in a fresh process as the fork server's children are. Before
    2026-12-06 the writable scans of a spliced avatar compiled a second splice there (seconds)."""
    import subprocess
    import sys
    copy_avatar(models_root, tmp_path, "a", n=4)
    r = subprocess.run([sys.executable, "-c", SERVES_WARM, str(tmp_path), PREFIX + "w"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "{}", f"compiled after the warm-up (kernel: signatures before, after): {r.stdout}"
