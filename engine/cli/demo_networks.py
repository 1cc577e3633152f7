"""The demo avatars' networks, built as ONNX graphs with numpy weights (no training, no downloads):
the ``demo`` network (the SyncTalk_2D I/O contract, a mouth that opens with the audio's energy), the
demo audio encoder, and the ``bench`` network (SyncTalk_2D's ``unet_328`` architecture and cost with
seeded random weights). :mod:`engine.cli.demo_avatars` writes them with the frames."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CROP = 320  # network face size
CROP_PAD = 328  # the crop is resized to 328 and the face is its [4:324, 4:324]
AUDIO_SHAPE = (32, 16, 16)
OPSET = 17
IR_VERSION = 8  # onnxruntime 1.31 refuses the IR version onnx 1.23 writes by default
BENCH_SEED = 20240917


# Head geometry, in pixels at scale 1, relative to the head centre (cx, cy).
FACE_AXES = (110.0, 150.0)  # face ellipse half-axes
RECT_SIZE = 182.0  # side of the square crop rectangle
RECT_TOP = -10.0  # crop top: between the eyes and the nose tip
EYE_Y, NOSE_Y, MOUTH_Y = -35.0, 30.0, 95.0
MOUTH_HALF_W = 36.0

# Where the mouth lands in the 320x320 network face (x, y), derived from the geometry above:
# crop fraction -> 328 image -> minus the 4-pixel border.
_MOUTH_FRAC_Y = (MOUTH_Y - RECT_TOP) / RECT_SIZE
MOUTH_CENTER_320 = (CROP / 2.0, round(_MOUTH_FRAC_Y * CROP_PAD - 4.0, 1))
MOUTH_HALF_WIDTH_320 = 60.0  # inside the drawn lips (36 / 182 * 328 = 65 px)
MOUTH_MAX_HALF_HEIGHT_320 = 42.0
AUDIO_GAIN = 1.5  # opening = tanh(AUDIO_GAIN * mean|audio|): 0 -> closed, ~1 -> 90 % open
# --------------------------------------------------------------------------------------------
# ONNX building helpers
# --------------------------------------------------------------------------------------------


def _io_contract() -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    inputs = [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6, CROP, CROP]),
        helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", *AUDIO_SHAPE]),
    ]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, CROP, CROP])]
    return inputs, outputs


def _finish(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="engine.demo_avatars",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


class _GraphBuilder:
    """Accumulates nodes and initializers with readable, unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name


# --------------------------------------------------------------------------------------------
# Demo network
# --------------------------------------------------------------------------------------------


LIP_RIM_320 = 5.0  # lip rim around the opening, pixels at full opening
LIP_COLOR = (0.41, 0.43, 0.73)  # BGR 0..1, the colour of the drawn lips
MOUTH_COLOR = (0.07, 0.06, 0.30)  # BGR 0..1, dark red, darkened towards the centre


def _mouth_grids() -> dict[str, np.ndarray]:
    """Constant per-pixel maps over the 320 face (shape [1, 1 or 3, 320, 320])."""
    mx, my = MOUTH_CENTER_320
    xs = np.arange(CROP, dtype=np.float32) + 0.5
    dx = xs[None, :] - (mx + 0.5)
    dy = xs[:, None] - (my + 0.5)
    full = (CROP, CROP)

    def one_minus_dx2(half_w: float) -> np.ndarray:
        return np.broadcast_to(1.0 - (dx / half_w) ** 2, full).astype(np.float32)[None, None]

    r = np.sqrt((dx / MOUTH_HALF_WIDTH_320) ** 2 + (dy / MOUTH_MAX_HALF_HEIGHT_320) ** 2)
    shade = 0.45 + 0.55 * np.clip(r, 0.0, 1.0)
    color = np.array(MOUTH_COLOR, np.float32)[:, None, None] * shade[None]
    return {
        "mouth/one_minus_dx2": one_minus_dx2(MOUTH_HALF_WIDTH_320),
        "lips/one_minus_dx2": one_minus_dx2(MOUTH_HALF_WIDTH_320 + LIP_RIM_320),
        "mouth/dy2": np.broadcast_to(dy * dy, full).astype(np.float32)[None, None],
        "mouth/color": color.astype(np.float32)[None],
        "lips/color": np.array(LIP_COLOR, np.float32).reshape(1, 3, 1, 1),
    }


def _ellipse_mask(b: _GraphBuilder, name: str, half_h: str, one_minus_dx2: str) -> str:
    """Soft mask of the ellipse dy^2 < h^2 (1 - dx^2/a^2), zero everywhere when h = 0.

    inside = h^2 (1 - dx^2/a^2) - dy^2 grows by about 2h per pixel inwards at the top and bottom
    edges, so clip(inside / (3h), 0, 1) is a ~1.5-pixel anti-aliased edge.
    """
    h2 = b.op("Mul", [half_h, half_h], f"{name}/h2")
    t = b.op("Mul", [h2, one_minus_dx2], f"{name}/h2_width")
    inside = b.op("Sub", [t, "mouth/dy2"], f"{name}/inside")
    edge = b.op("Mul", [half_h, "mask/edge"], f"{name}/edge_h")
    denom = b.op("Add", [edge, "mask/eps"], f"{name}/denom")
    ramp = b.op("Div", [inside, denom], f"{name}/ramp")
    return b.op("Clip", [ramp, "mask/zero", "mask/one"], f"{name}/mask")


def build_demo_network() -> onnx.ModelProto:
    """Reference face with a dark mouth whose opening follows the audio energy.

    Per batch item: opening = tanh(g * mean|audio|), mouth half-height h = H * opening pixels,
    lips half-height (H + rim) * opening. The lips, then the dark mouth, are blended over the
    reference face (channels 0-2 of ``input``): out = x + mask * (colour - x). Zero audio gives
    zero masks and an output equal to the reference face. Nothing mixes batch items.
    """
    b = _GraphBuilder()
    for name, value in _mouth_grids().items():
        b.const(name, value)
    b.const("ref/starts", np.array([0], np.int64))
    b.const("ref/ends", np.array([3], np.int64))
    b.const("ref/axes", np.array([1], np.int64))
    b.const("energy/gain", np.array(AUDIO_GAIN, np.float32))
    b.const("mouth/max_half_height", np.array(MOUTH_MAX_HALF_HEIGHT_320, np.float32))
    b.const("lips/max_half_height", np.array(MOUTH_MAX_HALF_HEIGHT_320 + LIP_RIM_320, np.float32))
    b.const("mask/edge", np.array(3.0, np.float32))
    b.const("mask/eps", np.array(1e-6, np.float32))
    b.const("mask/zero", np.array(0.0, np.float32))
    b.const("mask/one", np.array(1.0, np.float32))

    ref = b.op("Slice", ["input", "ref/starts", "ref/ends", "ref/axes"], "ref")
    absa = b.op("Abs", ["audio"], "energy/abs")
    e = b.op("ReduceMean", [absa], "energy/mean", axes=[1, 2, 3], keepdims=1)  # [B,1,1,1]
    opening = b.op("Tanh", [b.op("Mul", [e, "energy/gain"], "energy/scaled")], "energy/opening")
    h_mouth = b.op("Mul", [opening, "mouth/max_half_height"], "mouth/half_height")
    h_lips = b.op("Mul", [opening, "lips/max_half_height"], "lips/half_height")
    m_lips = _ellipse_mask(b, "lips", h_lips, "lips/one_minus_dx2")
    m_mouth = _ellipse_mask(b, "mouth", h_mouth, "mouth/one_minus_dx2")
    d_lips = b.op("Mul", [m_lips, b.op("Sub", ["lips/color", ref], "lips/color_minus_ref")], "lips/delta")
    with_lips = b.op("Add", [ref, d_lips], "with_lips")
    diff = b.op("Sub", ["mouth/color", with_lips], "mouth/color_minus_face")
    d_mouth = b.op("Mul", [m_mouth, diff], "mouth/delta")
    b.nodes.append(helper.make_node("Add", [with_lips, d_mouth], ["output"], name="output"))

    inputs, outputs = _io_contract()
    graph = helper.make_graph(b.nodes, "synctalk2d_demo", inputs, outputs, b.inits)
    return _finish(graph, "Demo lip-sync network: reference face plus an audio-driven mouth opening.")


# --------------------------------------------------------------------------------------------
# Demo audio encoder
# --------------------------------------------------------------------------------------------

AUDIO_ENCODER_NAME = "audio_encoder.onnx"  # under the models root, shared by every avatar
AUDIO_FEATURES = 512
AUDIO_ENCODER_SEED = 512
# s = clip((mean(window) - ENCODER_FLOOR) * ENCODER_SCALE, 0, ENCODER_MAX). The normalised mel is
# in [-4, 4] with silence at -4; the floor -3.5 is a dead zone above silence and a -80 dBFS noise
# floor (whose windows average about -3.96), so both give exactly 0. Speech from
# engine/audio/speech.py (peak 0.3) has window means of about -3.3 .. -1.6, i.e. s of 0.1 .. 0.95,
# changing syllable by syllable (a window is 200 ms).
ENCODER_FLOOR = -3.5
ENCODER_SCALE = 0.5
ENCODER_MAX = 1.2


def audio_encoder_pattern(seed: int = AUDIO_ENCODER_SEED) -> np.ndarray:
    """The encoder's fixed ``[512]`` float32 vector of +-1 (seeded): ``audio_features = s * P``."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(AUDIO_FEATURES) < 0.5, -1.0, 1.0).astype(np.float32)


def build_demo_audio_encoder() -> onnx.ModelProto:
    """A loudness "encoder" with the real audio-encoder contract.

    ``mel_spectrogram`` float32 ``[N, 1, 80, 16]`` (one normalised mel window per video frame) ->
    ``audio_features`` float32 ``[N, 512]``: ``e`` = the window's mean, ``s = clip((e + 3.5) / 2,
    0, 1.2)``, output ``s * P`` with ``P`` a fixed +-1 vector (:func:`audio_encoder_pattern`), so
    ``mean|audio_features| == s``. Silence (all -4) gives exactly zero features; the demo
    network's mouth opening is ``tanh(1.5 * mean|features|)`` over the 16 vectors of a frame.
    Nothing mixes batch items.
    """
    b = _GraphBuilder()
    b.const("enc/offset", np.array(-ENCODER_FLOOR, np.float32))
    b.const("enc/scale", np.array(ENCODER_SCALE, np.float32))
    b.const("enc/min", np.array(0.0, np.float32))
    b.const("enc/max", np.array(ENCODER_MAX, np.float32))
    b.const("enc/pattern", audio_encoder_pattern()[None, :])  # [1, 512]
    e = b.op("ReduceMean", ["mel_spectrogram"], "enc/mean", axes=[2, 3], keepdims=0)  # [N, 1]
    t = b.op("Add", [e, "enc/offset"], "enc/shift")
    t = b.op("Mul", [t, "enc/scale"], "enc/scaled")
    s = b.op("Clip", [t, "enc/min", "enc/max"], "enc/level")  # [N, 1]
    b.nodes.append(helper.make_node("Mul", [s, "enc/pattern"], ["audio_features"], name="audio_features"))
    inputs = [helper.make_tensor_value_info("mel_spectrogram", TensorProto.FLOAT, ["batch", 1, 80, 16])]
    outputs = [helper.make_tensor_value_info("audio_features", TensorProto.FLOAT, ["batch", AUDIO_FEATURES])]
    graph = helper.make_graph(b.nodes, "demo_audio_encoder", inputs, outputs, b.inits)
    return _finish(graph, "Demo audio encoder: mel window loudness times a fixed +-1 pattern.")


# --------------------------------------------------------------------------------------------
# Bench network: SyncTalk_2D unet_328 Model(6, mode='ave') with folded BatchNorm
# --------------------------------------------------------------------------------------------

_CH = (32, 64, 128, 256, 512)


class _UNetBuilder(_GraphBuilder):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = np.random.default_rng(seed)

    def conv(self, x: str, name: str, cin: int, cout: int, k: int = 1, stride: int = 1, pad: int = 0,
             groups: int = 1, gain: float = 2.0, bn: bool = True) -> str:
        """Conv (+ BatchNorm folded into weight and bias). ``gain`` 2 is He init for a following ReLU."""
        fan_in = (cin // groups) * k * k
        w = self.rng.standard_normal((cout, cin // groups, k, k), dtype=np.float32)
        w *= np.float32(math.sqrt(gain / fan_in))
        if bn:  # a plausible trained BatchNorm, folded: w' = w * g / sqrt(v + eps), b' = beta - m * that
            gamma = self.rng.uniform(0.9, 1.1, cout).astype(np.float32)
            beta = self.rng.normal(0.0, 0.02, cout).astype(np.float32)
            mean = self.rng.normal(0.0, 0.02, cout).astype(np.float32)
            var = self.rng.uniform(0.9, 1.1, cout).astype(np.float32)
            f = gamma / np.sqrt(var + 1e-5)
            w *= f[:, None, None, None]
            bias = beta - mean * f
        else:
            bias = self.rng.normal(0.0, 0.02, cout).astype(np.float32)
        self.const(f"{name}.weight", w)
        self.const(f"{name}.bias", bias.astype(np.float32))
        return self.op("Conv", [x, f"{name}.weight", f"{name}.bias"], name, kernel_shape=[k, k],
                       strides=[stride, stride], pads=[pad] * 4, group=groups)

    def relu(self, x: str, name: str) -> str:
        return self.op("Relu", [x], name)

    def inverted_residual(self, x: str, name: str, cin: int, cout: int, stride: int, residual: bool,
                          expand: int = 2) -> str:
        hid = cin * expand
        y = self.relu(self.conv(x, f"{name}.expand", cin, hid), f"{name}.expand_relu")
        y = self.relu(self.conv(y, f"{name}.dw", hid, hid, k=3, stride=stride, pad=1, groups=hid),
                      f"{name}.dw_relu")
        # Projection (no ReLU): unit gain, halved on residual branches so sums stay bounded.
        y = self.conv(y, f"{name}.project", hid, cout, gain=0.25 if residual else 1.0)
        if residual:
            return self.op("Add", [x, y], f"{name}.add")
        return y

    def double_conv_dw(self, x: str, name: str, cin: int, cout: int, stride: int) -> str:
        y = self.inverted_residual(x, f"{name}.0", cin, cout, stride, residual=False)
        return self.inverted_residual(y, f"{name}.1", cout, cout, 1, residual=True)

    def up(self, x: str, skip: str, name: str, cin: int, cout: int) -> str:
        if "up/scales" not in {t.name for t in self.inits}:
            self.const("up/scales", np.array([1.0, 1.0, 2.0, 2.0], np.float32))
        u = self.op("Resize", [x, "", "up/scales"], f"{name}.upsample", mode="linear",
                    coordinate_transformation_mode="align_corners")
        c = self.op("Concat", [u, skip], f"{name}.concat", axis=1)
        return self.double_conv_dw(c, f"{name}.conv", cin, cout, stride=1)

    def audio_conv_ave(self, x: str) -> str:
        ch = _CH
        n = "audio_model"
        x = self.inverted_residual(x, f"{n}.conv1", ch[0], ch[1], 1, residual=False)
        x = self.inverted_residual(x, f"{n}.conv2", ch[1], ch[2], 1, residual=False)
        x = self.relu(self.conv(x, f"{n}.conv3", ch[2], ch[3], k=3, pad=1), f"{n}.conv3_relu")
        x = self.inverted_residual(x, f"{n}.conv4", ch[3], ch[3], 1, residual=True)
        x = self.relu(self.conv(x, f"{n}.conv5", ch[3], ch[4], k=3, stride=2, pad=3), f"{n}.conv5_relu")
        x = self.inverted_residual(x, f"{n}.conv6", ch[4], ch[4], 1, residual=True)
        return self.inverted_residual(x, f"{n}.conv7", ch[4], ch[4], 1, residual=True)


def build_bench_network(seed: int = BENCH_SEED) -> onnx.ModelProto:
    """SyncTalk_2D's 320x320 U-Net (``Model(6, mode='ave')``) with deterministic random weights."""
    ch = _CH
    b = _UNetBuilder(seed)
    x1 = b.inverted_residual("input", "inc", 6, ch[0], 1, residual=False)  # 320
    x2 = b.double_conv_dw(x1, "down1", ch[0], ch[0], 2)  # 160
    x3 = b.double_conv_dw(x2, "down2", ch[0], ch[1], 2)  # 80
    x4 = b.double_conv_dw(x3, "down3", ch[1], ch[2], 2)  # 40
    x5 = b.double_conv_dw(x4, "down4", ch[2], ch[3], 2)  # 20
    x6 = b.double_conv_dw(x5, "down5", ch[3], ch[4], 2)  # 10
    a = b.audio_conv_ave("audio")  # [B,512,10,10]
    f = b.op("Concat", [x6, a], "fuse.concat", axis=1)
    f = b.double_conv_dw(f, "fuse_conv.0", ch[4] * 2, ch[4], 1)
    f = b.double_conv_dw(f, "fuse_conv.1", ch[4], ch[3], 1)
    y = b.up(f, x5, "up1", ch[4], ch[3] // 2)  # 20
    y = b.up(y, x4, "up2", ch[3], ch[2] // 2)  # 40
    y = b.up(y, x3, "up3", ch[2], ch[1] // 2)  # 80
    y = b.up(y, x2, "up4", ch[1], ch[0])  # 160
    y = b.up(y, x1, "up5", ch[1], ch[0] // 2)  # 320
    # Gain 16: decoder activations have a spread of ~0.2, so the logits get a spread of ~1 and the
    # sigmoid output varies over most of 0..1 without saturating.
    logits = b.conv(y, "outc", ch[0] // 2, 3, gain=16.0, bn=False)
    b.nodes.append(helper.make_node("Sigmoid", [logits], ["output"], name="output"))

    inputs, outputs = _io_contract()
    graph = helper.make_graph(b.nodes, "synctalk2d_unet328_ave", inputs, outputs, b.inits)
    return _finish(graph, "SyncTalk_2D U-Net (unet_328 Model(6, 'ave')), BatchNorm folded, random weights.")


def count_cost(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, multiply-accumulates per frame) of the Conv, Gemm and MatMul nodes.

    Parameters are the elements of those nodes' initializer inputs (weights and biases); MACs come
    from the inferred output shapes, per batch item.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    shapes: dict[str, list] = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    inits = {t.name: tuple(t.dims) for t in g.initializer}
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    params = 0
    macs = 0
    counted: set[str] = set()
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        for name in node.input:
            if name in inits and name not in counted:
                counted.add(name)
                params += int(np.prod(inits[name])) if inits[name] else 1
        if node.op_type == "Conv":
            w = shapes[node.input[1]]
            out = shapes[node.output[0]]
            macs += int(np.prod(w)) * int(np.prod(out[2:]))
        elif node.op_type == "Gemm":
            w = shapes[node.input[1]]
            macs += int(np.prod(w))
        else:  # MatMul: [..., M, K] x [K, N], the leading (batch) axis excluded
            a, w = shapes[node.input[0]], shapes[node.input[1]]
            rows = int(np.prod([d for d in a[1:-1]])) if len(a) > 2 else 1
            macs += rows * int(np.prod(w[-2:]))
    return params, macs
