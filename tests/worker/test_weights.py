"""Splitting a network into its architecture and its weights (engine/worker/weights.py)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.worker.weights import NotShareable, prepare, read_weights
from tests.nets import tiny_network, write_network


def test_networks_of_one_recipe_share_an_architecture_and_keep_their_own_weights(tmp_path, models_root):
    a = write_network(tmp_path / "a.onnx", tiny_network(1))
    b = write_network(tmp_path / "b.onnx", tiny_network(2))
    sa, sb = prepare(a, tmp_path / "cache"), prepare(b, tmp_path / "cache")
    assert sa.arch == sb.arch and sa.graph_file == sb.graph_file
    assert sa.weights_file != sb.weights_file
    # the weights are the initializers, exactly; the scalar and the integer shapes stay in the graph
    for split, path in ((sa, a), (sb, b)):
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        w = read_weights(split)
        assert set(w) == {"c1.w", "c1.b", "a.w", "a.b", "c2.w", "c2.b"}
        for name, arr in w.items():
            assert arr.dtype == np.float32 and np.array_equal(arr, inits[name])
        net = sum(v.nbytes for v in w.values())
        assert net <= split.weight_bytes < net + 64 * len(w)                  # each tensor 64-byte aligned
    graph = onnx.load(str(sa.graph_file)).graph
    assert {t.name for t in graph.initializer} == {"scale", "flat", "as_bias"}
    assert {"c1.w", "a.w"} <= {i.name for i in graph.input}
    # another architecture: the demo network, and the same recipe with another constant
    demo = prepare(models_root / "demo" / "checkpoint" / "model_best.onnx", tmp_path / "cache")
    other = prepare(write_network(tmp_path / "c.onnx", tiny_network(1, scale=0.25)), tmp_path / "cache")
    assert len({sa.arch, demo.arch, other.arch}) == 3


def test_the_split_is_made_once_and_read_from_the_cache(tmp_path):
    a = write_network(tmp_path / "a.onnx", tiny_network(1))
    first = prepare(a, tmp_path / "cache")
    stamps = [p.stat().st_mtime_ns for p in (first.graph_file, first.weights_file, first.index_file)]
    again = prepare(a, tmp_path / "cache")
    assert again == first
    assert [p.stat().st_mtime_ns for p in (again.graph_file, again.weights_file, again.index_file)] == stamps
    assert json.loads(first.index_file.read_text())["source"] == str(a)


def _model(nodes, inputs, outputs, inits):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_network_that_cannot_be_split_says_why_and_the_answer_is_cached(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 6, 4, 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 6, 4, 4])
    plain = write_network(tmp_path / "plain.onnx", _model([helper.make_node("Identity", ["input"], ["output"])],
                                                          [x], [y], []))
    with pytest.raises(NotShareable, match="no floating-point weights"):
        prepare(plain, tmp_path / "cache")
    with pytest.raises(NotShareable, match="no floating-point weights"):     # from the cache's index
        prepare(plain, tmp_path / "cache")
    branch = helper.make_graph([helper.make_node("Identity", ["input"], ["b"])], "then", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 6, 4, 4])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    w = numpy_helper.from_array(np.ones((1, 6, 4, 4), np.float32), "w")
    nodes = [helper.make_node("If", ["cond"], ["o"], then_branch=branch, else_branch=branch),
             helper.make_node("Mul", ["o", "w"], ["output"])]
    sub = write_network(tmp_path / "sub.onnx", _model(nodes, [x], [y], [cond, w]))
    with pytest.raises(NotShareable, match="subgraphs"):
        prepare(sub, tmp_path / "cache")


def test_constants_an_operator_needs_stay_in_the_graph(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 6, 4, 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 6, 8, 8])
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    gain = numpy_helper.from_array(np.full((1, 6, 1, 1), 2, np.float32), "gain")
    nodes = [helper.make_node("Resize", ["input", "", "scales"], ["r"], mode="nearest"),
             helper.make_node("Mul", ["r", "gain"], ["output"])]
    split = prepare(write_network(tmp_path / "r.onnx", _model(nodes, [x], [y], [scales, gain])), tmp_path / "cache")
    assert set(read_weights(split)) == {"gain"}
    assert [t.name for t in onnx.load(str(split.graph_file)).graph.initializer] == ["scales"]
