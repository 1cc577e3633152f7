"""Baseline JPEG at the bit level, for splicing (:mod:`engine.kernels.splice`): numba kernels that walk
an entropy-coded scan MCU by MCU, re-code it with restart markers and splice one scan's MCUs into
another's (the header, and the Huffman tables as arrays, come from :mod:`engine.kernels.jpeg_layout`).

Bit positions count in the unstuffed data (0xFF00 -> 0xFF, markers removed), most significant bit
first. The output writer stuffs a zero byte after every 0xFF and pads with 1-bits before markers,
as libjpeg does. Plain functions on numpy arrays: no sockets, no processes, no shared memory.
"""
from __future__ import annotations

import numba
import numpy as np

from engine.kernels.jpeg_layout import EOI, JpegError, dri_header, huffman_arrays, parse_jpeg, scan_end

# One record (int32) per interval of a background frame that the region touches. Offsets are in
# bytes of the frame's stuffed scan; C's bit positions count from C's first byte, unstuffed.
R_J = 0                     # interval number
R_START, R_END = 1, 2       # its first byte; the marker after it (or the scan's end)
R_COL, R_ROW, R_COUNT = 3, 4, 5   # the region's MCUs in it: first column, row, count
R_ASTUFF, R_ABITS = 6, 7    # A (the MCUs before the region) ends in this byte, after this many bits
R_ADC = 8                   # 3 values: the DC predictors after A (0 when A is empty)
R_CSTUFF, R_CBIT = 11, 12   # C (the MCUs after the region) starts in this byte (-1: no C), at this bit
R_CDC0, R_CDC1, R_CFIRST = 13, 16, 19   # 3 values each for C's first MCU: DC code start and end bit, first DC
R_DEND = 22                 # the end bit of the interval's data (then padding)
RECLEN = 23


# -- numba kernels: bits in, bits out ---------------------------------------------------------------
# Bit positions count in the unstuffed data (0xFF00 -> 0xFF, markers removed), most significant bit
# first. The output writer keeps its state in st = [byte position, pending bits, number pending].

@numba.njit(cache=True, nogil=True, inline="always")
def _peek(d, p, n):
    """``n`` <= 32 bits of unstuffed data ``d`` from bit ``p`` (``d`` padded with zero bytes)."""
    i = p >> 3
    w = ((np.int64(d[i]) << 32) | (np.int64(d[i + 1]) << 24) | (np.int64(d[i + 2]) << 16)
         | (np.int64(d[i + 3]) << 8) | np.int64(d[i + 4]))
    return (w >> (40 - (p & 7) - n)) & ((np.int64(1) << n) - 1)


@numba.njit(cache=True, nogil=True)
def _memcpy(o, at, s, a, n):
    """o[at:at+n] = s[a:a+n]; a loop over views with a range index compiles to a vectorised copy
    (numba's own slice assignment is ~30 x slower)."""
    ov = o[at:at + n]
    sv = s[a:a + n]
    for i in range(n):
        ov[i] = sv[i]


@numba.njit(cache=True, nogil=True)
def _put(o, st, v, n):
    """Append the ``n`` (<= 32) low bits of ``v``, stuffing a zero byte after every 0xFF."""
    acc = (st[1] << n) | v
    nb = st[2] + n
    op = st[0]
    while nb >= 8:
        nb -= 8
        byte = (acc >> nb) & 255
        o[op] = byte
        op += 1
        if byte == 255:
            o[op] = 0
            op += 1
    st[0] = op
    st[1] = acc & ((np.int64(1) << nb) - 1)
    st[2] = nb


@numba.njit(cache=True, nogil=True)
def _copy_bits(o, st, d, b0, b1):
    """Append bits [b0, b1) of ``d``."""
    op, acc, nb = st[0], st[1], st[2]
    while b1 - b0 >= 32:
        acc = (acc << 32) | _peek(d, b0, 32)
        b0 += 32
        w = (acc >> nb) & 0xFFFFFFFF            # the next 4 output bytes (nb < 8 bits stay pending)
        x = ~w & 0xFFFFFFFF
        if ((x - 0x01010101) & ~x & 0x80808080) == 0:      # no 0xFF byte: nothing to stuff
            o[op] = w >> 24
            o[op + 1] = (w >> 16) & 255
            o[op + 2] = (w >> 8) & 255
            o[op + 3] = w & 255
            op += 4
        else:
            for sh in (24, 16, 8, 0):
                byte = (w >> sh) & 255
                o[op] = byte
                op += 1
                if byte == 255:
                    o[op] = 0
                    op += 1
        acc &= (np.int64(1) << nb) - 1
    st[0], st[1], st[2] = op, acc, nb
    if b1 > b0:
        _put(o, st, _peek(d, b0, b1 - b0), b1 - b0)


@numba.njit(cache=True, nogil=True)
def _pad(o, st):
    """Fill the last byte with 1-bits, as libjpeg does before a marker."""
    if st[2] > 0:
        n = 8 - st[2]
        _put(o, st, (np.int64(1) << n) - 1, n)


@numba.njit(cache=True, nogil=True)
def _put_dc(o, st, diff, dcenc, t):
    a = diff if diff >= 0 else -diff
    s = 0
    while a:
        s += 1
        a >>= 1
    _put(o, st, dcenc[0, t, s], dcenc[1, t, s])
    if s:
        _put(o, st, (diff if diff >= 0 else diff - 1) & ((np.int64(1) << s) - 1), s)


@numba.njit(cache=True, nogil=True)
def _unstuff(s, a, b, d, starts, ends):
    """Stuffed bytes ``s[a:b]`` -> data bytes ``d``; at every RSTn marker a new interval begins.
    ``starts[i]``: data offset of interval i; ``ends[i]``: offset in ``s`` of the marker after it
    (or ``b``); both sized for the intervals expected. Returns (data bytes, intervals found);
    ``d`` gets 16 zero bytes of padding."""
    n = 0
    k = 0
    starts[0] = 0
    i = a
    while i < b:
        c = s[i]
        if c == 255 and i + 1 < b:
            m = s[i + 1]
            if m == 0:
                d[n] = 255
                n += 1
                i += 2
                continue
            ends[k] = i
            k += 1
            if 0xD0 <= m <= 0xD7 and k < starts.shape[0]:
                starts[k] = n
                i += 2
                continue
            break                       # any other marker ends the scan
        d[n] = c
        n += 1
        i += 1
    else:
        ends[k] = b
        k += 1
    d[n:n + 16] = 0
    return n, k


@numba.njit(cache=True, nogil=True)
def _walk(d, p, n, nmcu, blocks, ncomp, lut, pred, info):
    """Decode ``nmcu`` MCUs of ``d`` (``n`` data bytes, then zero padding) from bit ``p``; ``pred``
    holds the DC predictors (updated).
    info[m] = MCU start bit, then per component c at 1+4c: DC code start and end bit, the first
    block's DC and the last block's DC. Returns the end bit, or -1 on a code the tables lack or
    when the MCUs run past the data.
    ``blocks`` [3, nb]: component, DC LUT row and AC LUT row of each block of an MCU."""
    nb = blocks.shape[1]
    dlen = n + 16                    # never read past the padding _unstuff wrote
    q = p >> 3
    acc = np.int64(0)
    n = 0
    while n <= 48:
        if q >= dlen:
            return -1
        acc = (acc << 8) | np.int64(d[q])
        q += 1
        n += 8
    n -= p & 7
    for m in range(nmcu):
        info[m, 0] = q * 8 - n
        prev = -1
        for blk in range(nb):
            if n < 27:
                if q + 8 > dlen:              # a scan that runs past its data: corrupt
                    return -1
                while n <= 48:
                    acc = (acc << 8) | np.int64(d[q])
                    q += 1
                    n += 8
            c = blocks[0, blk]
            first = c != prev
            prev = c
            e = lut[blocks[1, blk], (acc >> (n - 16)) & 0xFFFF]
            ln = e >> 8
            if ln == 0:
                return -1
            if first:
                info[m, 1 + 4 * c] = q * 8 - n
            n -= ln
            s = e & 15
            if s:
                bits = (acc >> (n - s)) & ((np.int64(1) << s) - 1)
                n -= s
                if bits < (np.int64(1) << (s - 1)):
                    bits -= (np.int64(1) << s) - 1
                pred[c] += bits
            if first:
                info[m, 2 + 4 * c] = q * 8 - n
                info[m, 3 + 4 * c] = pred[c]
            k = 1
            ac = blocks[2, blk]
            while k < 64:
                if n < 27:
                    if q + 8 > dlen:
                        return -1
                    while n <= 48:
                        acc = (acc << 8) | np.int64(d[q])
                        q += 1
                        n += 8
                e = lut[ac, (acc >> (n - 16)) & 0xFFFF]
                ln = e >> 8
                if ln == 0:
                    return -1
                rs = e & 255
                n -= ln + (rs & 15)
                if rs & 15 == 0:
                    if rs == 0xF0:
                        k += 16
                        continue
                    break
                k += (rs >> 4) + 1
            if k > 64:
                return -1
        for c in range(ncomp):
            info[m, 4 + 4 * c] = pred[c]
    return q * 8 - n


@numba.njit(cache=True, nogil=True)
def _emit_run(o, st, d, start, dcpos, first_dc, end, pred, ncomp, dcenc, comp_dc):
    """Copy MCUs [start, end) of ``d`` to the output, re-coding the first DC of each component of
    the first MCU against ``pred``. ``dcpos[2c:2c+2]``: the DC code's start and end bit."""
    p = start
    for c in range(ncomp):
        _copy_bits(o, st, d, p, dcpos[2 * c])
        _put_dc(o, st, first_dc[c] - pred[c], dcenc, comp_dc[c])
        p = dcpos[2 * c + 1]
    _copy_bits(o, st, d, p, end)


@numba.njit(cache=True, nogil=True)
def _run_args(info, m, ncomp, dcpos, first_dc):
    for c in range(ncomp):
        dcpos[2 * c] = info[m, 1 + 4 * c]
        dcpos[2 * c + 1] = info[m, 2 + 4 * c]
        first_dc[c] = info[m, 3 + 4 * c]


@numba.njit(cache=True, nogil=True)
def _restart(s, a, b, k, nmcu, blocks, ncomp, lut, dcenc, comp_dc, o, d, info):
    """Re-code the scan ``s[a:b]`` (no restarts) with a restart every ``k`` MCUs into ``o``.
    Returns the bytes written, or -1 when the scan does not decode."""
    starts = np.zeros(1, np.int64)
    ends = np.zeros(1, np.int64)
    n, _ = _unstuff(s, a, b, d, starts, ends)
    pred = np.zeros(ncomp, np.int64)
    end = _walk(d, 0, n, nmcu, blocks, ncomp, lut, pred, info)
    if end < 0 or end > 8 * n:
        return -1
    st = np.zeros(3, np.int64)
    dcpos = np.zeros(2 * ncomp, np.int64)
    first = np.zeros(ncomp, np.int64)
    zero = np.zeros(ncomp, np.int64)
    nint = (nmcu + k - 1) // k
    for j in range(nint):
        m0 = j * k
        m1 = min(m0 + k, nmcu)
        _run_args(info, m0, ncomp, dcpos, first)
        _emit_run(o, st, d, info[m0, 0], dcpos, first, info[m1, 0] if m1 < nmcu else end, zero, ncomp,
                  dcenc, comp_dc)
        _pad(o, st)
        if j < nint - 1:
            o[st[0]] = 255
            o[st[0] + 1] = 0xD0 + (j & 7)
            st[0] += 2
    return st[0]


@numba.njit(cache=True, nogil=True)
def _stuffed_offset(s, start, u):
    """Offset in ``s`` of data byte ``u`` of the interval whose stuffed bytes begin at ``start``."""
    i = start
    while u > 0:
        i += 2 if s[i] == 255 else 1
        u -= 1
    return i


@numba.njit(cache=True, nogil=True)
def _plan_frame(s, a, b, k, mcux, nint, box, blocks, ncomp, lut, d, info, recs):
    """Walk the intervals of the restart-coded background scan ``s[a:b]`` (``nint`` intervals of
    ``k`` MCUs) that the MCU box (mx0, my0, mx1, my1) touches; one record per interval (see the
    R_* constants; offsets relative to ``a``). Returns the number of records, or -1 when the scan
    does not decode."""
    starts = np.zeros(nint, np.int64)
    ends = np.zeros(nint, np.int64)
    n, cnt = _unstuff(s, a, b, d, starts, ends)
    if cnt != nint:
        return -1
    per_row = mcux // k
    mx0, my0, mx1, my1 = box[0], box[1], box[2], box[3]
    pred = np.zeros(ncomp, np.int64)
    r = 0
    for row in range(my0, my1):
        for ji in range(mx0 // k, (mx1 - 1) // k + 1):
            j = row * per_row + ji
            c0 = ji * k                    # first MCU column of the interval
            lo = max(mx0, c0)
            hi = min(mx1, c0 + k)
            base = starts[j] * 8
            pred[:] = 0
            end = _walk(d, base, n, k, blocks, ncomp, lut, pred, info)
            if end < 0 or end > 8 * (starts[j + 1] if j + 1 < cnt else n):
                return -1
            rec = recs[r]
            rec[R_J] = j
            start = a if j == 0 else ends[j - 1] + 2
            rec[R_START] = start - a
            rec[R_END] = ends[j] - a
            rec[R_COL] = lo
            rec[R_ROW] = row
            rec[R_COUNT] = hi - lo
            if lo > c0:
                aend = info[lo - c0, 0] - base
                rec[R_ASTUFF] = _stuffed_offset(s, start, aend >> 3) - a
                rec[R_ABITS] = aend & 7
                for c in range(ncomp):
                    rec[R_ADC + c] = info[lo - c0 - 1, 4 + 4 * c]
            else:
                rec[R_ASTUFF] = start - a
                rec[R_ABITS] = 0
                for c in range(ncomp):
                    rec[R_ADC + c] = 0
            if hi < c0 + k:
                m = hi - c0
                cs = info[m, 0] - base
                cb = base + (cs >> 3) * 8          # C's first byte, as a bit position in d
                rec[R_CSTUFF] = _stuffed_offset(s, start, cs >> 3) - a
                rec[R_CBIT] = cs & 7
                for c in range(ncomp):
                    rec[R_CDC0 + c] = info[m, 1 + 4 * c] - cb
                    rec[R_CDC1 + c] = info[m, 2 + 4 * c] - cb
                    rec[R_CFIRST + c] = info[m, 3 + 4 * c]
                rec[R_DEND] = end - cb
            else:
                rec[R_CSTUFF] = -1
            r += 1
    return r


@numba.njit(cache=True, nogil=True)
def _splice(header, ref, dims, bg, recs, rs, a, b, bw, bh, bx0, by0, blocks, ncomp, lut, dcenc, comp_dc, o, d,
            scratch, info):
    """``o`` = header + the background scan ``bg`` with the region's MCUs (scan ``rs[a:b]`` of the
    region JPEG: bw x bh MCUs at MCU (bx0, by0)) spliced in + EOI. Returns the size; -1 when the
    region does not decode, -2 when ``o`` is too small, -3 when the region's header differs from
    ``ref`` (a frame's header of these settings) other than in the 4 size bytes at ``dims``."""
    for i in range(a):
        if rs[i] != ref[i] and not dims <= i < dims + 4:
            return -3
    one = np.zeros(1, np.int64)
    one2 = np.zeros(1, np.int64)
    n, _ = _unstuff(rs, a, b, d, one, one2)
    pred = np.zeros(ncomp, np.int64)
    nreg = bw * bh
    rend = _walk(d, 0, n, nreg, blocks, ncomp, lut, pred, info)
    if rend > 8 * n:                 # decoded into the padding: the region's scan is short
        return -1
    if rend < 0:
        return -1
    info[nreg, 0] = rend
    # worst case: every region byte stuffed, each rebuilt interval a few bytes longer
    if o.shape[0] < header.shape[0] + bg.shape[0] + 2 * (b - a) + 16 * recs.shape[0] + 64:
        return -2
    hn = header.shape[0]
    _memcpy(o, 0, header, 0, hn)
    st = np.zeros(3, np.int64)
    st[0] = hn
    cur = 0
    dcpos = np.zeros(2 * ncomp, np.int64)
    first = np.zeros(ncomp, np.int64)
    pr = np.zeros(ncomp, np.int64)
    for r in range(recs.shape[0]):
        rec = recs[r]
        # the background up to A's last partial byte, as it is (already stuffed)
        ln = rec[R_ASTUFF] - cur
        _memcpy(o, st[0], bg, cur, ln)
        st[0] += ln
        if rec[R_ABITS]:
            _put(o, st, np.int64(bg[rec[R_ASTUFF]]) >> (8 - rec[R_ABITS]), rec[R_ABITS])
        for c in range(ncomp):
            pr[c] = rec[R_ADC + c]
        m0 = (rec[R_ROW] - by0) * bw + rec[R_COL] - bx0
        m1 = m0 + rec[R_COUNT]
        _run_args(info, m0, ncomp, dcpos, first)
        _emit_run(o, st, d, info[m0, 0], dcpos, first, info[m1, 0], pr, ncomp, dcenc, comp_dc)
        if rec[R_CSTUFF] >= 0:
            for c in range(ncomp):
                pr[c] = info[m1 - 1, 4 + 4 * c]
                dcpos[2 * c] = rec[R_CDC0 + c]
                dcpos[2 * c + 1] = rec[R_CDC1 + c]
                first[c] = rec[R_CFIRST + c]
            _unstuff(bg, rec[R_CSTUFF], rec[R_END], scratch, one, one2)
            _emit_run(o, st, scratch, rec[R_CBIT], dcpos, first, rec[R_DEND], pr, ncomp, dcenc, comp_dc)
        _pad(o, st)
        cur = rec[R_END]
    ln = bg.shape[0] - cur
    _memcpy(o, st[0], bg, cur, ln)
    st[0] += ln
    o[st[0]] = 255
    o[st[0] + 1] = EOI
    return st[0] + 2


def add_restarts(jpeg: bytes, k: int) -> bytes:
    """``jpeg`` (baseline, no restart markers) re-coded losslessly with a restart every ``k`` MCUs:
    the bytes libjpeg writes when it encodes the same image with ``restart_interval = k``."""
    layout = parse_jpeg(jpeg)
    if layout.restart:
        raise JpegError("the JPEG already has restart markers")
    huff = huffman_arrays(layout)
    s = np.frombuffer(jpeg, np.uint8)
    a, b = layout.scan, scan_end(jpeg)
    nmcu = layout.mcux * layout.mcuy
    out = np.empty(2 * (b - a) + 4 * (nmcu // max(1, k)) + 64, np.uint8)
    n = _restart(s, a, b, k, nmcu, huff.blocks, huff.ncomp, huff.lut, huff.dcenc, huff.comp_dc, out,
                 np.empty(b - a + 16, np.uint8),
                 np.empty((nmcu + 1, 1 + 4 * len(layout.comp_h)), np.int64))
    if n < 0:
        raise JpegError("the scan does not decode with its own Huffman tables")
    return dri_header(jpeg, layout, k) + out[:n].tobytes() + b"\xff\xd9"
