"""Baseline JPEG headers, for splicing (:mod:`engine.kernels.splice`): what a frame's header says
(size, sampling, tables, where the scan starts), its Huffman tables as the arrays the numba kernels
of :mod:`engine.kernels.jpeg_bits` walk with, and the header of a re-coded frame with restart markers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SOI, EOI, SOF0, SOF1, DHT, SOS, DQT, DRI = 0xD8, 0xD9, 0xC0, 0xC1, 0xC4, 0xDA, 0xDB, 0xDD


class JpegError(ValueError):
    """Not a baseline JPEG this module can splice (the message says what)."""


# -- header parsing --------------------------------------------------------------------------------
@dataclass(frozen=True)
class JpegLayout:
    """What splicing needs from a baseline JPEG's header; equal for every frame of one size and setting."""
    width: int
    height: int
    comp_h: tuple[int, ...]
    comp_v: tuple[int, ...]
    comp_dc: tuple[int, ...]            # DC table of each component (SOS)
    comp_ac: tuple[int, ...]
    tables: bytes                       # DQT + DHT segments, to check that two JPEGs share them
    sof: int                            # offset of the SOF marker
    sos: int                            # offset of the SOS marker
    scan: int                           # offset of the first entropy-coded byte
    restart: int                        # DRI interval (0: none)
    dht: tuple[tuple[int, bytes, bytes], ...]   # (class*4+id, 16 code counts, symbols)

    @property
    def mcu_w(self) -> int:
        return 8 * max(self.comp_h)

    @property
    def mcu_h(self) -> int:
        return 8 * max(self.comp_v)

    @property
    def mcux(self) -> int:
        return -(-self.width // self.mcu_w)

    @property
    def mcuy(self) -> int:
        return -(-self.height // self.mcu_h)


def parse_jpeg(data: bytes | np.ndarray) -> JpegLayout:
    """Read the header of a baseline (SOF0/SOF1, Huffman, 8-bit, one interleaved scan) JPEG."""
    b = bytes(data[:65536]) if isinstance(data, np.ndarray) else bytes(data[:65536])
    if b[:2] != b"\xff\xd8":
        raise JpegError("not a JPEG (no SOI marker)")
    p, sof, sof_at, restart, tables, dht = 2, None, 0, 0, [], []
    while True:
        if p + 4 > len(b) or b[p] != 0xFF:
            raise JpegError(f"malformed JPEG header at byte {p}")
        marker = b[p + 1]
        length = int.from_bytes(b[p + 2:p + 4], "big")
        seg = b[p + 4:p + 2 + length]
        if marker in (SOF0, SOF1):
            sof, sof_at = seg, p
        elif 0xC2 <= marker <= 0xCF and marker not in (DHT, 0xC8, 0xCC):
            raise JpegError(f"SOF{marker - 0xC0} (progressive, lossless or arithmetic) cannot be spliced")
        elif marker == DRI:
            restart = int.from_bytes(seg[:2], "big")
        elif marker in (DQT, DHT):
            tables.append(b[p:p + 2 + length])
            if marker == DHT:
                q = 0
                while q < len(seg):
                    counts = seg[q + 1:q + 17]
                    n = sum(counts)
                    dht.append(((seg[q] >> 4) * 4 + (seg[q] & 15), counts, seg[q + 17:q + 17 + n]))
                    q += 17 + n
        elif marker == SOS:
            if sof is None:
                raise JpegError("SOS before SOF")
            ns = seg[0]
            ids = [sof[6 + 3 * i] for i in range(sof[5])]
            if sof[0] != 8 or ns != len(ids) or seg[1 + 2 * ns:4 + 2 * ns] != b"\x00\x3f\x00":
                raise JpegError("only 8-bit baseline JPEGs with one interleaved scan can be spliced")
            sel = {seg[1 + 2 * i]: seg[2 + 2 * i] for i in range(ns)}
            h = tuple(sof[7 + 3 * i] >> 4 for i in range(len(ids)))
            v = tuple(sof[7 + 3 * i] & 15 for i in range(len(ids)))
            return JpegLayout(
                width=int.from_bytes(sof[3:5], "big"), height=int.from_bytes(sof[1:3], "big"), comp_h=h, comp_v=v,
                comp_dc=tuple(sel[i] >> 4 for i in ids), comp_ac=tuple(sel[i] & 15 for i in ids),
                tables=b"".join(tables), sof=sof_at, sos=p, scan=p + 2 + length, restart=restart, dht=tuple(dht))
        p += 2 + length


def restart_interval(mcux: int, target: int) -> int:
    """The restart interval used for a frame ``mcux`` MCUs wide: the largest divisor of ``mcux``
    not above ``target`` (so an interval never straddles two MCU rows)."""
    target = max(1, min(target, mcux))
    return max(d for d in range(1, target + 1) if mcux % d == 0)


# -- Huffman tables as arrays for the numba kernels ----------------------------------------------
@dataclass(frozen=True)
class HuffmanArrays:
    lut: np.ndarray          # [8, 65536] uint16: (code length << 8) | symbol for the next 16 bits; 0 = bad code
    dcenc: np.ndarray        # [2, 4, 16] int64: DC code and code length by table and category
    blocks: np.ndarray       # [3, blocks per MCU] int64: component, DC LUT row, AC LUT row (4 + table)
    comp_dc: np.ndarray      # per component: its DC table
    ncomp: int


def huffman_arrays(layout: JpegLayout) -> HuffmanArrays:
    lut = np.zeros((8, 65536), np.uint16)
    dcenc = np.zeros((2, 4, 16), np.int64)
    for slot, counts, symbols in layout.dht:
        code, k = 0, 0
        for length in range(1, 17):
            for _ in range(counts[length - 1]):
                sym = symbols[k]
                k += 1
                lo = code << (16 - length)
                lut[slot, lo:lo + (1 << (16 - length))] = (length << 8) | sym
                if slot < 4 and sym < 16:
                    dcenc[0, slot, sym], dcenc[1, slot, sym] = code, length
                code += 1
            code <<= 1
    blocks = [(c, layout.comp_dc[c], 4 + layout.comp_ac[c])
              for c, (h, v) in enumerate(zip(layout.comp_h, layout.comp_v)) for _ in range(h * v)]
    return HuffmanArrays(lut, dcenc, np.array(blocks, np.int64).T.copy(), np.array(layout.comp_dc, np.int64),
                         len(layout.comp_h))


# -- restart coding ----------------------------------------------------------------------------------
def dri_header(jpeg: bytes | np.ndarray, layout: JpegLayout, k: int) -> bytes:
    """The header of ``jpeg`` with a DRI segment for interval ``k`` before SOS (where libjpeg puts it)."""
    head = bytes(jpeg[:layout.scan])
    if layout.restart:
        raise JpegError("the JPEG already has restart markers")
    return head[:layout.sos] + b"\xff\xdd\x00\x04" + k.to_bytes(2, "big") + head[layout.sos:]


def scan_end(jpeg: bytes | np.ndarray) -> int:
    n = len(jpeg)
    if n < 4 or jpeg[n - 2] != 0xFF or jpeg[n - 1] != EOI:
        raise JpegError("the JPEG does not end with EOI")
    return n - 2
