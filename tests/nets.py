"""Small lip-sync networks for tests: one architecture (``[B,6,F,F]`` image and ``[B,32,16,16]``
audio to a ``[B,3,F,F]`` face, the SyncTalk_2D contract), any number of networks of it that differ
only in their seeded weights, as every avatar trained from one recipe does."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FACE = 320
WIDTH = 8


def tiny_network(seed: int, face: int = FACE, width: int = WIDTH, scale: float = 0.5) -> onnx.ModelProto:
    """conv 3x3 (6 -> width) + relu, plus the audio through a dense layer as a per-channel bias,
    conv 3x3 (width -> 3), times a constant ``scale`` (a scalar that stays in the graph), sigmoid."""
    rng = np.random.default_rng(seed)
    w = {"c1.w": rng.normal(0, 0.3, (width, 6, 3, 3)), "c1.b": rng.normal(0, 0.1, width),
         "a.w": rng.normal(0, 0.02, (32 * 16 * 16, width)), "a.b": rng.normal(0, 0.1, width),
         "c2.w": rng.normal(0, 0.3, (3, width, 3, 3)), "c2.b": rng.normal(0, 0.1, 3)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.array(scale, np.float32), "scale"),
              numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
              numpy_helper.from_array(np.array([0, width, 1, 1], np.int64), "as_bias")]
    nodes = [
        helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Reshape", ["audio", "flat"], ["af"]),
        helper.make_node("Gemm", ["af", "a.w", "a.b"], ["ab"]),
        helper.make_node("Reshape", ["ab", "as_bias"], ["ab4"]),
        helper.make_node("Add", ["r1", "ab4"], ["h2"]),
        helper.make_node("Conv", ["h2", "c2.w", "c2.b"], ["h3"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["h3", "scale"], ["h4"]),
        helper.make_node("Sigmoid", ["h4"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6, face, face]),
         helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", 32, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, face, face])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name=f"tests seed {seed}")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_network(path: Path, model: onnx.ModelProto) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def run_own_session(path: Path, image: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """The reference: the network in a plain ONNX Runtime session of its own (one thread, no graph
    optimisation: half the CPU of the default for these tiny networks, built by the hundred)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.graph_optimization_level = 1, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input": image, "audio": audio})[0]


def make_avatar(root: Path, name: str, seed: int, frames_from: Path, **kw) -> Path:
    """Avatar ``name`` under ``root``: the frames and crop rectangles of the avatar at
    ``frames_from`` (its frames folder linked), its own :func:`tiny_network` of ``seed``."""
    import os
    import shutil

    from engine.cli.demo_avatars import FRAMES_DIR, ONNX_REL, RECTS_NAME
    avatar = root / name
    avatar.mkdir(parents=True, exist_ok=True)
    link = avatar / FRAMES_DIR
    if not link.exists():
        os.symlink(frames_from / FRAMES_DIR, link)
    shutil.copy(frames_from / RECTS_NAME, avatar / RECTS_NAME)
    write_network(avatar / ONNX_REL, tiny_network(seed, **kw))
    return avatar / ONNX_REL
