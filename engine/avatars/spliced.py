"""An avatar's spliced form: what the compositors need to splice its frames, without decoded backgrounds.

With ``output.encoder = "splice"`` (the default) an avatar's segment holds, per frame, its
background JPEG with restart markers, the pixels of the region a paste can change (the crop
rectangle widened to whole MCUs), the 4-pixel border of its (F+8) crop (all a synctalk paste needs
of the crop) and the records of the background intervals the region touches (``engine/kernels/splice.py``):
about 0.2 MB per 1280x720 frame instead of 2.76 MB + 0.32 MB. The network's image input is cut
from the region pixels when a batch needs it (:meth:`SplicedAvatarView.crops_for`).

The form is built once from the avatar's frames and saved beside them, in
``<avatar>/.prepared/splice-<settings>.lsep``; the file is the segment's bytes, so a later load is
one file read. It is rebuilt when a frame file, ``crop_rects.json``, the face size, a JPEG setting
or the encoder's version changes (a fingerprint of them is in its header), or when its checksum
does not match. An avatar folder that cannot be written to is served all the same (the form is
then built at every load).

Segment and file layout (created and unlinked by the front's avatar store, like the decoded one)::

    0          JSON header: layout "splice", name, n, h, w, face, settings, restart interval,
               source fingerprint, section offsets, crc32 of the rest; padded to 4096 bytes
    rects      int32 [n, 4]        crop rectangles
    boxes      int32 [n, 4]        each region's pixels x0, y0, x1, y1
    index      int64 [n, 4]        per frame: scan offset, scan bytes, pixels offset, first record
    header     uint8               the JPEG header every frame shares (with its DRI segment)
    scans      uint8               each frame's entropy-coded bytes (between header and EOI)
    pixels     uint8               each region's pixels, BGR, [y1-y0, x1-x0, 3]
    borders    uint8 [n, B, 3]     each (F+8) crop's packed border (kernels.crop_border)
    records    int32 [R+1, RECLEN] the records; frame k's are [index[k,3], index[k+1,3]) (row R: end)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engine.avatars.disk import (
    AvatarError,
    AvatarFiles,
    check_frame_size,
    decode_frame,
    read_rects,
)
from engine.avatars.frames import HEADER_BYTES
from engine.kernels.image import BORDER, border_size, crop_border, cut_crop
from engine.kernels.splice import (
    ENCODER_VERSION,
    RECLEN,
    FrameCodec,
    FrameParts,
    Settings,
)
from engine.runtime.shm import Segment

log = logging.getLogger("engine.avatar_splice")

FORMAT = "lse-splice-1"
ALIGN = 64
PREPARED_DIR = ".prepared"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def settings_key(settings: Settings, face: int) -> str:
    """The prepared file's name part: everything that changes its bytes besides the frames."""
    # True: where output.fastdct stood (removed: it changed no byte), so prepared files keep their names
    blob = json.dumps([FORMAT, ENCODER_VERSION, settings.quality, settings.subsampling, True,
                       settings.interval_px, face])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def source_fingerprint(files: AvatarFiles) -> str:
    """Names, sizes and modification times of the frames and crop_rects.json."""
    items = []
    for p in (*files.frames, files.rects):
        st = p.stat()
        items.append([p.name, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def prepared_path(files: AvatarFiles, settings: Settings, face: int) -> Path:
    return files.folder / PREPARED_DIR / f"splice-{settings_key(settings, face)}.lsep"


def _sections(n: int, header: int, scans: int, pixels: int, face: int, records: int) -> dict[str, int]:
    off, out = HEADER_BYTES, {}
    for name, size in (("rects", n * 16), ("boxes", n * 16), ("index", (n + 1) * 32), ("header", header),
                       ("scans", scans), ("pixels", pixels), ("borders", n * border_size(face) * 3),
                       ("records", (records + 1) * RECLEN * 4)):
        out[name] = off
        off = _align(off + size)
    out["total"] = off
    return out


def estimate_bytes(n: int, h: int, w: int, face: int, rects: np.ndarray | None = None,
                   subsampling: str = "420", jpeg_bits_per_pixel: float = 1.0) -> int:
    """A spliced avatar's segment size before it is built (the JPEG sizes are not known yet:
    ``jpeg_bits_per_pixel`` of the frame, 1.0 by default, about twice the demo avatar's at q75).
    The regions are exact when ``rects`` is given, else a 256x256 region per frame is assumed."""
    mw = {"444": 8, "422": 16, "420": 16, "411": 32}.get(subsampling, 16)
    mh = 16 if subsampling == "420" else 8
    if rects is None:
        pixels = n * 256 * 256 * 3
        recs = n * 24
    else:
        r = np.asarray(rects, np.int64)
        x0, y0 = r[:, 0] // mw * mw, r[:, 1] // mh * mh
        x1, y1 = np.minimum(w, -(-r[:, 2] // mw) * mw), np.minimum(h, -(-r[:, 3] // mh) * mh)
        pixels = int(((x1 - x0) * (y1 - y0) * 3).sum())
        recs = int(((y1 - y0) // mh * 3).sum())
    scans = int(n * h * w * jpeg_bits_per_pixel / 8)
    return _sections(n, 1024, scans, pixels, face, recs)["total"]


class SplicedAvatarView:
    """Numpy views of one spliced avatar in shared memory (any process)."""

    layout = "splice"

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        meta = json.loads(bytes(segment.buf[:HEADER_BYTES]).rstrip(b"\0"))
        if meta.get("layout") != "splice" or meta.get("format") != FORMAT:
            raise AvatarError(f"segment {segment.name} is not a spliced avatar of format {FORMAT}")
        self.meta = meta
        self.name: str = meta["name"]
        n, self.height, self.width, self.face = meta["n"], meta["h"], meta["w"], meta["face"]
        self.n = n
        s = meta["sections"]
        self.settings = Settings(**{k: v for k, v in meta["settings"].items() if k != "fastdct"})   # older files
        self.rects = segment.array((n, 4), np.int32, s["rects"])
        self.boxes = segment.array((n, 4), np.int32, s["boxes"])
        self.index = segment.array((n + 1, 4), np.int64, s["index"])
        self.header = segment.array((meta["header_bytes"],), np.uint8, s["header"])
        self.scans = segment.array((meta["scan_bytes"],), np.uint8, s["scans"])
        self.pixels = segment.array((meta["pixel_bytes"],), np.uint8, s["pixels"])
        self.borders = segment.array((n, border_size(self.face), 3), np.uint8, s["borders"])
        self.records = segment.array((meta["records"] + 1, RECLEN), np.int32, s["records"])
        self._crops: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.segment.size

    def memory(self) -> dict[str, int]:
        """Bytes by part (``models`` shows them)."""
        m = self.meta
        return {"total": self.nbytes, "jpeg": m["header_bytes"] + m["scan_bytes"], "regions": m["pixel_bytes"],
                "borders": self.borders.nbytes, "records": self.records.nbytes,
                "per_frame": self.nbytes // max(1, self.n)}

    @classmethod
    def attach(cls, segment_name: str) -> SplicedAvatarView:
        return cls(Segment(segment_name))

    # -- per frame ---------------------------------------------------------------------------------
    def scan(self, k: int) -> np.ndarray:
        off, size = self.index[k, 0], self.index[k, 1]
        return self.scans[off:off + size]

    def region(self, k: int) -> np.ndarray:
        x0, y0, x1, y1 = (int(v) for v in self.boxes[k])
        off = int(self.index[k, 2])
        return self.pixels[off:off + (y1 - y0) * (x1 - x0) * 3].reshape(y1 - y0, x1 - x0, 3)

    def parts(self, k: int, border: bool = True) -> FrameParts:
        rect = tuple(int(v) for v in self.rects[k])
        return FrameParts(self.scan(k), self.records[self.index[k, 3]:self.index[k + 1, 3]], self.region(k),
                          rect, self.borders[k] if border else None)  # type: ignore[arg-type]

    def crop(self, k: int, dst: np.ndarray | None = None) -> np.ndarray:
        """Frame k's (F+8) crop, cut from its region: equal to cutting it from the whole frame."""
        x0, y0 = int(self.boxes[k, 0]), int(self.boxes[k, 1])
        x1, y1, x2, y2 = (int(v) for v in self.rects[k])
        return cut_crop(self.region(k), (x1 - x0, y1 - y0, x2 - x0, y2 - y0), self.face, dst)

    def crops_for(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(crops, index into them) for :func:`~engine.kernels.image.fill_visual`: each distinct frame's
        crop is cut once into a reused buffer (~70 us per frame on one core)."""
        uniq, inv = np.unique(np.asarray(indices, np.int64), return_inverse=True)
        side = self.face + 2 * BORDER
        if self._crops is None or len(self._crops) < len(uniq):
            self._crops = np.empty((max(len(uniq), 8), side, side, 3), np.uint8)
        for j, k in enumerate(uniq):
            self.crop(int(k), self._crops[j])
        return self._crops, inv.astype(np.int64)

    def close(self) -> None:
        for name in ("rects", "boxes", "index", "header", "scans", "pixels", "borders", "records", "_crops"):
            setattr(self, name, None)
        self.segment.close()

    # -- building and loading ------------------------------------------------------------------------
    @classmethod
    def create(cls, segment_name: str, files: AvatarFiles, face: int, settings: Settings,
               progress: Callable[[int, int], None] | None = None, threads: int = 4,
               save: bool = True) -> SplicedAvatarView:
        """Load the prepared file when it is current, else build the form from the frames (and save
        it); either way into a new segment the caller owns."""
        path = prepared_path(files, settings, face)
        fingerprint = source_fingerprint(files)
        view = _read_prepared(path, segment_name, files.name, fingerprint)
        if view is not None:
            if progress:
                progress(view.n, view.n)
            return view
        view = _build(segment_name, files, face, settings, fingerprint, progress, threads)
        if save:
            _save(view, path)
        return view


def _build(segment_name: str, files: AvatarFiles, face: int, settings: Settings, fingerprint: str,
           progress: Callable[[int, int], None] | None, threads: int) -> SplicedAvatarView:
    first = decode_frame(files.frames[0])
    h, w = first.shape[:2]
    n = len(files.frames)
    rects = read_rects(files.rects, n, w, h)
    codec = FrameCodec(h, w, settings)
    hl = len(codec.header)
    done = 0

    def one(i: int) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
        img = first if i == 0 else decode_frame(files.frames[i])
        check_frame_size(files.frames[i], img, h, w)
        rect = tuple(int(v) for v in rects[i])
        jpeg = codec.encode_full(img)
        x0, y0, x1, y1 = codec.box(rect)
        return (jpeg[hl:-2], codec.plan(jpeg, rect), np.ascontiguousarray(img[y0:y1, x0:x1]),
                crop_border(cut_crop(img, rect, face)))

    parts = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for p in pool.map(one, range(n)):
            parts.append(p)
            done += 1
            if progress:
                progress(done, n)
    scan_bytes = sum(len(p[0]) for p in parts)
    pixel_bytes = sum(p[2].nbytes for p in parts)
    records = sum(len(p[1]) for p in parts)
    sec = _sections(n, hl, scan_bytes, pixel_bytes, face, records)
    meta = {"layout": "splice", "format": FORMAT, "name": files.name, "n": n, "h": h, "w": w, "face": face,
            "settings": {"quality": settings.quality, "subsampling": settings.subsampling,
                         "interval_px": settings.interval_px},
            "interval": codec.interval, "encoder": ENCODER_VERSION, "sources": fingerprint,
            "header_bytes": hl, "scan_bytes": scan_bytes, "pixel_bytes": pixel_bytes, "records": records,
            "sections": sec}
    seg = Segment(segment_name, sec["total"], create=True)
    try:
        seg.buf[:HEADER_BYTES] = _header_block(meta)        # provisional (no crc yet): the views need it
        view = SplicedAvatarView(seg)
        view.rects[:] = rects
        view.header[:] = codec.header
        so = po = ro = 0
        for k, (scan, recs, region, border) in enumerate(parts):
            view.boxes[k] = codec.box(tuple(rects[k]))
            view.index[k] = (so, len(scan), po, ro)
            view.scans[so:so + len(scan)] = np.frombuffer(scan, np.uint8)
            view.pixels[po:po + region.nbytes] = region.reshape(-1)
            view.borders[k] = border
            view.records[ro:ro + len(recs)] = recs
            so, po, ro = so + len(scan), po + region.nbytes, ro + len(recs)
        view.index[n] = (so, 0, po, ro)
        meta["crc32"] = zlib.crc32(seg.buf[HEADER_BYTES:sec["total"]])
        seg.buf[:HEADER_BYTES] = _header_block(meta)
        view.meta = meta
        return view
    except BaseException:
        seg.close()
        raise


def _header_block(meta: dict) -> bytes:
    raw = json.dumps(meta).encode()
    if len(raw) > HEADER_BYTES:
        raise AvatarError(f"prepared header of {len(raw)} bytes does not fit {HEADER_BYTES}")
    return raw + bytes(HEADER_BYTES - len(raw))


def _current_meta(f, name: str, path: Path, fingerprint: str) -> dict | None:
    """The prepared file's header when it matches the avatar's files and this encoder, else None."""
    try:
        meta = json.loads(f.read(HEADER_BYTES).rstrip(b"\0"))
        total = meta["sections"]["total"]
    except (ValueError, KeyError, TypeError):
        log.warning("avatar %s: %s is unreadable, rebuilding it", name, path)
        return None
    if (meta.get("format") != FORMAT or meta.get("sources") != fingerprint or meta.get("encoder") != ENCODER_VERSION
            or os.fstat(f.fileno()).st_size != total):
        log.info("avatar %s: %s is stale, rebuilding it", name, path)
        return None
    return meta


def prepared_size(files: AvatarFiles, settings: Settings, face: int) -> int:
    """The segment size of the avatar's prepared file when it is current, else 0."""
    path = prepared_path(files, settings, face)
    try:
        with open(path, "rb") as f:
            meta = _current_meta(f, files.name, path, source_fingerprint(files))
    except OSError:
        return 0
    return meta["sections"]["total"] if meta else 0


def _read_prepared(path: Path, segment_name: str, name: str, fingerprint: str) -> SplicedAvatarView | None:
    """The prepared file as a new segment, or None when it is missing, stale or damaged."""
    try:
        f = open(path, "rb")
    except OSError:
        return None
    with f:
        meta = _current_meta(f, name, path, fingerprint)
        if meta is None:
            return None
        total = meta["sections"]["total"]
        f.seek(0)
        head = f.read(HEADER_BYTES)
        seg = Segment(segment_name, total, create=True)
        try:
            seg.buf[:HEADER_BYTES] = head
            got = f.readinto(seg.buf[HEADER_BYTES:total])
            if got != total - HEADER_BYTES or zlib.crc32(seg.buf[HEADER_BYTES:total]) != meta.get("crc32"):
                log.warning("avatar %s: %s is damaged (checksum), rebuilding it", name, path)
                seg.close()
                return None
            return SplicedAvatarView(seg)
        except BaseException:
            seg.close()
            raise


def _save(view: SplicedAvatarView, path: Path) -> None:
    """Write the segment's bytes to ``path`` (atomically); a folder we cannot write to is not an error."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(view.segment.buf[:view.meta["sections"]["total"]])
        os.replace(tmp, path)
    except OSError as e:
        log.warning("avatar %s: could not save its prepared form to %s (%s); it will be built again at "
                    "the next load", view.name, path, e)
        try:
            tmp.unlink()
        except OSError:
            pass
