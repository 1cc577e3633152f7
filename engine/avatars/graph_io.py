"""An ONNX model's inputs and outputs, read from the file's protobuf bytes without the ``onnx`` package.

The front checks every avatar's network when it loads the avatar, and each GPU worker checks the
audio encoder's contract; both need only the names and dims of the graph's inputs and outputs.
``onnx.load`` costs twice: importing ``onnx`` takes about 0.5 CPU-s in each process that does it
(the front, and every GPU worker on the CPU provider: on CUDA a worker imports it anyway, for its
start-up probe and shared sessions), and parsing a large network's protobuf holds the
interpreter lock for the whole file (40-80 ms for a SyncTalk_2D-size network) while the front's
thread waits. This reader maps the file and walks only the fields it needs, in protobuf's wire
format (https://protobuf.dev/programming-guides/encoding/), skipping everything else, weights
included, by their lengths:

    ModelProto.graph (7) -> GraphProto.input (11), .output (12), .initializer (5) -> TensorProto.name (8)
    ValueInfoProto.name (1), .type (2) -> TypeProto.tensor_type (1) -> .shape (2) -> .dim (1)
    -> Dimension.dim_value (1) | .dim_param (2)

It gives what ``onnx.load(path, load_external_data=False)`` gives for the same fields, in the files
exporters write (one exception: see ``_dims``): inputs that are not initializers, outputs, each with its dims (``None`` for a symbolic or missing dim; no dims
for an input that is not a tensor). tests/avatars/test_graph_io.py compares the two.
"""
from __future__ import annotations

import mmap
from pathlib import Path

Dims = list[int | None]
Buffer = bytes | mmap.mmap                 # indexed (an int) and sliced (bytes); no buffer is exported

# field numbers in onnx.proto
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 5, 11, 12
_TENSOR_NAME = 8
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR, _TENSOR_TYPE_SHAPE, _SHAPE_DIM = 1, 2, 1
_DIM_VALUE, _DIM_PARAM = 1, 2


class GraphReadError(ValueError):
    """The bytes are not a well-formed protobuf message where the reader looked."""


def _varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise GraphReadError(f"a varint runs past its message at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise GraphReadError(f"a varint longer than 10 bytes at byte {pos}")


def _fields(buf: Buffer, pos: int, end: int):
    """(field number, wire type, value) of each field in ``buf[pos:end]``: the integer of a varint,
    the (start, end) of a length-delimited field, None for fixed 32/64-bit ones."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise GraphReadError(f"field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise GraphReadError(f"a field of {n} bytes at byte {pos} runs past its message")
            yield field, wire, (pos, pos + n)
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise GraphReadError(f"a fixed-size field runs past its message at byte {pos}")
            yield field, wire, None
        else:
            raise GraphReadError(f"wire type {wire} at byte {pos} (groups or not protobuf: never in an ONNX file)")


def _string(buf: Buffer, span: tuple[int, int]) -> str:
    try:
        return buf[span[0]:span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise GraphReadError(f"a name at byte {span[0]} is not UTF-8") from None


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _each(buf: Buffer, span: tuple[int, int], number: int):
    """The spans of the length-delimited fields numbered ``number`` in ``buf[span]``, in order."""
    for f, w, v in _fields(buf, *span):
        if f == number and w == 2:
            yield v


def _dim(buf: Buffer, span: tuple[int, int]) -> int | None:
    """A Dimension: its dim_value, None for a dim_param or neither (one of: the last set wins)."""
    dim: int | None = None
    for f, w, v in _fields(buf, *span):
        if f == _DIM_VALUE and w == 0:
            dim = _int64(v)
        elif f == _DIM_PARAM:
            dim = None
    return dim


def _dims(buf: Buffer, span: tuple[int, int]) -> Dims:
    """A TypeProto's tensor shape (no dims when it is not a tensor or has no shape). A singular
    message that occurs again is merged by protobuf (the dims would concatenate); this keeps the
    last occurrence: no exporter splits a type."""
    dims: Dims = []
    for tensor in _each(buf, span, _TYPE_TENSOR):
        dims = []
        for shape in _each(buf, tensor, _TENSOR_TYPE_SHAPE):
            dims = [_dim(buf, d) for d in _each(buf, shape, _SHAPE_DIM)]
    return dims


def _value_info(buf: Buffer, span: tuple[int, int]) -> tuple[str, Dims]:
    name, dims = "", []
    for f, w, v in _fields(buf, *span):
        if f == _VALUE_NAME and w == 2:
            name = _string(buf, v)
        elif f == _VALUE_TYPE and w == 2:
            dims = _dims(buf, v)
    return name, dims


def _tensor_name(buf: Buffer, span: tuple[int, int]) -> str:
    name = ""
    for v in _each(buf, span, _TENSOR_NAME):
        name = _string(buf, v)
    return name


def graph_io_of(buf: Buffer) -> tuple[dict[str, Dims], list[tuple[str, Dims]]]:
    """The inputs (initializers excluded) and outputs of the ModelProto in ``buf``; raises
    :class:`GraphReadError` where the bytes are not protobuf."""
    inputs: list[tuple[str, Dims]] = []
    outputs: list[tuple[str, Dims]] = []
    inits: set[str] = set()
    for graph in _each(buf, (0, len(buf)), _MODEL_GRAPH):
        for f2, w2, v2 in _fields(buf, *graph):           # every occurrence: repeated fields concatenate
            if w2 != 2:
                continue
            if f2 == _GRAPH_INPUT:
                inputs.append(_value_info(buf, v2))
            elif f2 == _GRAPH_OUTPUT:
                outputs.append(_value_info(buf, v2))
            elif f2 == _GRAPH_INITIALIZER:
                inits.add(_tensor_name(buf, v2))
    return {name: dims for name, dims in inputs if name not in inits}, outputs


def read_graph_io(path: Path) -> tuple[dict[str, Dims], list[tuple[str, Dims]]]:
    """:func:`graph_io_of` the file at ``path`` (mapped, not read: a network's weights are never copied)."""
    with open(path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            return graph_io_of(b"")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return graph_io_of(mm)
