"""engine.avatars.graph_io: a graph's inputs and outputs read from the protobuf bytes agree with
``onnx.load`` on the engine's own networks and on the cases a user's export may hold (symbolic
dims, initializers listed as inputs, inputs that are not tensors, negative dims, a graph split over
several occurrences of its field); bytes that are not protobuf are refused with a message naming the
file; and checking an avatar imports no ``onnx`` (the cost the reader exists to avoid)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.avatars.disk import AvatarError, _graph_io, read_encoder, read_graph
from engine.avatars.graph_io import GraphReadError, graph_io_of, read_graph_io
from engine.cli.demo_networks import build_bench_network, build_demo_audio_encoder, build_demo_network


def by_onnx(model: onnx.ModelProto) -> tuple[dict, list]:
    """What the engine read with onnx.load before (the reference)."""
    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    inits = {i.name for i in model.graph.initializer}
    return ({i.name: dims(i) for i in model.graph.input if i.name not in inits},
            [(o.name, dims(o)) for o in model.graph.output])


def tensor(name, dims, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def odd_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    no_shape = onnx.ValueInfoProto(name="n")
    no_shape.type.tensor_type.elem_type = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Identity", ["x"], ["z"])], "odd",
        [tensor("x", ["batch", 3]), tensor("w", [3, 3]), seq, no_shape, tensor("neg", [-1, 0, 7]),
         tensor("ünï", [1])],
        [tensor("y", ["batch", 3]), tensor("z", [None, 3]), tensor("scalar", [])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("build", [build_demo_network, build_bench_network, build_demo_audio_encoder, odd_model])
def test_the_reader_agrees_with_onnx_load(build, tmp_path):
    model = build()
    data = model.SerializeToString()
    assert graph_io_of(data) == by_onnx(model)
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    assert read_graph_io(path) == by_onnx(model)                      # mapped from the file


def test_a_graph_field_that_occurs_twice_is_merged_as_protobuf_does(tmp_path):
    model = odd_model()
    half = onnx.ModelProto()
    half.graph.output.add().CopyFrom(tensor("late", [2, 5]))
    data = model.SerializeToString() + half.SerializeToString()      # protobuf: a second graph merges in
    merged = onnx.ModelProto.FromString(data)
    assert [o.name for o in merged.graph.output][-1] == "late"
    assert graph_io_of(data) == by_onnx(merged)


def test_the_engines_networks_still_pass_their_checks(tmp_path):
    (tmp_path / "net.onnx").write_bytes(build_demo_network().SerializeToString())
    (tmp_path / "enc.onnx").write_bytes(build_demo_audio_encoder().SerializeToString())
    g = read_graph(tmp_path / "net.onnx")
    assert g.image_shape[0] == 6 and g.output_shape[0] == 3 and g.face == g.image_shape[1]
    assert read_encoder(tmp_path / "enc.onnx").features > 0


@pytest.mark.parametrize("data, why", [
    (b"\x0b", "wire type 3"),                                        # a group start: not in ONNX files
    (b"\x3a\x05ab", "runs past its message"),                        # graph of 5 bytes, 2 there
    (b"\x08\xff\xff", "varint runs past"),                           # a truncated varint
    (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
    (b"\x00\x01", "field number 0"),
    (b"\x3a\x04\x5a\x02\x0a\xff", "runs past"),                      # an input whose name runs past
    (b"\x3a\x05\x5a\x03\x0a\x01\xff", "not UTF-8"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "wire type 7"),                           # a JPEG named .onnx
])
def test_bytes_that_are_not_an_onnx_model_are_refused_naming_the_file(data, why, tmp_path):
    with pytest.raises(GraphReadError, match=why):
        graph_io_of(data)
    path = tmp_path / "model_best.onnx"
    path.write_bytes(data)
    with pytest.raises(AvatarError, match=f"{path}: not a readable ONNX model"):
        _graph_io(path)


def test_an_empty_or_missing_file(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert _graph_io(tmp_path / "empty.onnx") == ({}, [])            # as onnx.load: an empty model
    with pytest.raises(AvatarError, match="expected 2 inputs"):
        read_graph(tmp_path / "empty.onnx")
    with pytest.raises(AvatarError, match="missing.onnx: not a readable ONNX model"):
        _graph_io(tmp_path / "missing.onnx")
    with pytest.raises(AvatarError, match="not a readable ONNX model"):
        _graph_io(tmp_path)                                           # a folder


def test_checking_a_network_and_an_encoder_imports_no_onnx(tmp_path):
    (tmp_path / "net.onnx").write_bytes(build_demo_network().SerializeToString())
    (tmp_path / "enc.onnx").write_bytes(build_demo_audio_encoder().SerializeToString())
    code = ("import sys; from pathlib import Path\n"
            "from engine.avatars.disk import read_graph, read_encoder\n"
            f"read_graph(Path({str(tmp_path / 'net.onnx')!r})); read_encoder(Path({str(tmp_path / 'enc.onnx')!r}))\n"
            "print(sorted(m for m in sys.modules if m == 'onnx' or m.startswith('onnx.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
